"""Convert a trained model between the trainer's DCP checkpoints and single-file forms.

    # DCP step folder (or a run's dump/checkpoints folder: its newest step) -> exported folder
    python tools/convert_checkpoint.py outputs/debug_model/checkpoints/step-00000200 exported/debug --to safetensors
    # -> one torch file
    python tools/convert_checkpoint.py outputs/debug_model exported/debug.pt --to torch
    # exported folder or torch file -> model-only DCP folder, for --checkpoint.initial_load_path
    python tools/convert_checkpoint.py exported/debug init/debug --to dcp

An exported folder holds model.safetensors, config.json (the model arguments)
and tokenizer.json; the torch file holds the same in one dict. Tensors are
copied bit for bit. A DCP checkpoint's tokenizer is the run's
model.tokenizer_path; give --tokenizer when it has moved.
"""

from __future__ import annotations

import argparse
import sys

from titan_lrt.export import read_model_files, write_checkpoint, write_exported_folder, write_torch_file

WRITERS = {"safetensors": write_exported_folder, "torch": write_torch_file, "dcp": write_checkpoint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="DCP step/checkpoints/dump folder, exported folder, or exported torch file")
    parser.add_argument("output", help="folder (safetensors, dcp) or file (torch) to create; must not exist")
    parser.add_argument("--to", required=True, choices=sorted(WRITERS), help="output form")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json of a DCP checkpoint whose run tokenizer moved"
    )
    args = parser.parse_args(argv)
    try:
        files = read_model_files(args.source, args.tokenizer)
        out = WRITERS[args.to](files, args.output)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_params = sum(t.numel() for t in files.state_dict.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in files.state_dict.values()})
    print(
        f"{files.source} -> {out} ({args.to}): {len(files.state_dict)} tensors, {n_params:,} parameters "
        f"({', '.join(dtypes)}), LRT mode {files.args.lrt.mode}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
