"""Print the config reference (every section and key) as Markdown, or refresh README.md.

python tools/config_reference.py            # print
python tools/config_reference.py --write    # replace the block between the markers in README.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from titan_lrt.config import config_reference

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def render_readme(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{config_reference().strip()}\n{END}{tail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="update README.md in place")
    if p.parse_args().write:
        README.write_text(render_readme(README.read_text()))
    else:
        print(config_reference())


if __name__ == "__main__":
    main()
