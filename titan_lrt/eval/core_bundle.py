"""Reading a CORE task bundle (the DCLM eval-bundle format) from a local folder, and rendering its prompts.

Layout (the bundle is never downloaded: the user points at a folder they have):

    <bundle>/core.yaml              icl_tasks: a list of tasks, each with
                                    label, dataset_uri, num_fewshot ([k] or k),
                                    icl_task_type, continuation_delimiter (default " ")
    <bundle>/eval_meta_data.csv     columns "Eval Task" and "Random baseline" (percent)
    <bundle>/eval_data/<dataset_uri>  one JSON object per line

A folder that holds `eval_bundle/core.yaml` is accepted too. Example fields by
task type:

    multiple_choice    query, choices, gold      prompt: query + delimiter + choice
    schema             context_options, continuation, gold
                                                 prompt: option + delimiter + continuation
    language_modeling  context, continuation     prompt: context + delimiter + continuation

Few-shot demonstrations (rendered with their gold answer, each followed by a
blank line) precede the prompt; for example i they are drawn from the other
examples with `random.Random(1234 + i)`, the convention of the reference
CORE implementations, so that scores stay comparable.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import yaml

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
_FIELDS = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}
_OPTIONS = {"multiple_choice": "choices", "schema": "context_options"}
FEWSHOT_SEPARATOR = "\n\n"


class BundleError(ValueError):
    """The bundle folder is missing or malformed; the message names the file and what is wrong."""


class TextEncoder(Protocol):
    bos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float
    """Accuracy of random guessing, as a fraction."""
    examples: tuple[dict, ...]


@dataclass(frozen=True)
class Request:
    """The token sequences of one example, and where in each the scored continuation lies."""

    sequences: list[list[int]]
    spans: list[tuple[int, int]]
    """(start, end): tokens[start:end] are scored, each predicted from the tokens before it."""
    gold: Optional[int]
    """Index of the right sequence (multiple_choice, schema); None for language_modeling."""


def find_bundle(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"CORE bundle {str(folder)!r}: no such folder (give the folder holding core.yaml)")
    for candidate in (folder, folder / "eval_bundle"):
        if (candidate / "core.yaml").is_file():
            return candidate
    raise BundleError(f"CORE bundle {str(folder)!r}: no core.yaml in it (nor in {folder / 'eval_bundle'})")


def load_bundle(folder: str | Path, tasks: Optional[Sequence[str]] = None) -> list[CoreTask]:
    """Read and check the bundle; `tasks` keeps only these labels (in bundle order)."""
    root = find_bundle(folder)
    entries = _task_entries(root / "core.yaml")
    baselines = _random_baselines(root / "eval_meta_data.csv")
    labels = [e["label"] for e in entries]
    unknown = sorted(set(tasks or ()) - set(labels))
    if unknown:
        raise BundleError(f"CORE tasks {unknown} are not in {root / 'core.yaml'}; it has {labels}")
    out = []
    for entry in entries:
        label = entry["label"]
        if tasks and label not in tasks:
            continue
        if label not in baselines:
            raise BundleError(f"{root / 'eval_meta_data.csv'}: no 'Random baseline' row for task {label!r}")
        task_type = entry["icl_task_type"]
        examples = _examples(root / "eval_data" / entry["dataset_uri"], task_type)
        fewshot = _fewshot(entry, root)
        if fewshot >= len(examples):
            raise BundleError(f"task {label!r}: num_fewshot={fewshot} needs more than {len(examples)} examples")
        delimiter = entry.get("continuation_delimiter", " ")
        out.append(CoreTask(label, task_type, fewshot, delimiter, baselines[label] / 100.0, examples))
    return out


def fewshot_examples(task: CoreTask, index: int) -> list[dict]:
    if task.num_fewshot == 0:
        return []
    others = [i for i in range(len(task.examples)) if i != index]
    return [task.examples[i] for i in random.Random(1234 + index).sample(others, task.num_fewshot)]


def render(task: CoreTask, index: int) -> tuple[list[str], list[str]]:
    """(prompts, full texts): the text before each scored continuation, and with it."""
    item, shots, d = task.examples[index], fewshot_examples(task, index), task.delimiter
    if task.task_type == "multiple_choice":
        head = "".join(s["query"] + d + s["choices"][s["gold"]] + FEWSHOT_SEPARATOR for s in shots) + item["query"] + d
        return [head] * len(item["choices"]), [head + c for c in item["choices"]]
    if task.task_type == "schema":
        head = "".join(s["context_options"][s["gold"]] + d + s["continuation"] + FEWSHOT_SEPARATOR for s in shots)
        prompts = [head + option + d for option in item["context_options"]]
        return prompts, [p + item["continuation"] for p in prompts]
    head = "".join(s["context"].strip() + d + s["continuation"] + FEWSHOT_SEPARATOR for s in shots)
    prompt = head + item["context"].strip() + d
    return [prompt], [prompt + item["continuation"]]


def build_request(task: CoreTask, index: int, tokenizer: TextEncoder, max_len: int) -> Request:
    """Tokenize the example's texts (BOS first); keep the last max_len tokens of a longer one.

    The scored span is where the texts differ: for multiple choice the tokens after the
    choices' common prefix, for schema the common suffix after the differing contexts,
    for language modeling the tokens after the common prefix with the bare prompt
    (robust to a tokenizer merging across the delimiter).
    """
    prompts, texts = render(task, index)
    sequences = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
    if task.task_type == "schema":
        suffix = _common_length([s[::-1] for s in sequences])
        spans = [(len(s) - suffix, len(s)) for s in sequences]
    else:
        others = sequences if len(sequences) > 1 else [*sequences, [tokenizer.bos_id, *tokenizer.encode(prompts[0])]]
        start = _common_length(others)
        spans = [(start, len(s)) for s in sequences]
    cropped_sequences, cropped_spans = [], []
    for seq, (start, end) in zip(sequences, spans):
        drop = max(0, len(seq) - max_len)
        if end <= start:
            raise ValueError(f"task {task.label!r} example {index}: its {len(sequences)} texts do not differ")
        if start - drop < 1:
            raise ValueError(
                f"task {task.label!r} example {index}: its continuation does not fit in max_len={max_len} tokens "
                f"(sequence of {len(seq)} tokens, continuation at {start}..{end})"
            )
        cropped_sequences.append(seq[drop:])
        cropped_spans.append((start - drop, end - drop))
    return Request(cropped_sequences, cropped_spans, task.examples[index].get("gold"))


# ---- reading and checking ---------------------------------------------------------------


def _task_entries(path: Path) -> list[dict]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise BundleError(f"{path}: not valid YAML ({err})") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{path}: expected a non-empty list under 'icl_tasks'")
    for i, entry in enumerate(entries):
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in (entry or {})]
        if missing:
            raise BundleError(f"{path}: icl_tasks[{i}] lacks {missing}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise BundleError(
                f"{path}: task {entry['label']!r} has icl_task_type={entry['icl_task_type']!r}; allowed {TASK_TYPES}"
            )
    return entries


def _fewshot(entry: dict, root: Path) -> int:
    value = entry["num_fewshot"]
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(
            f"{root / 'core.yaml'}: task {entry['label']!r} has num_fewshot={entry['num_fewshot']!r}; "
            "expected an integer >= 0 or a one-element list of it"
        )
    return value


def _random_baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise BundleError(f"{path}: missing (the bundle's metadata CSV with the random baselines)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise BundleError(f"{path}: expected the columns 'Eval Task' and 'Random baseline'")
    out = {}
    for row in rows:
        try:
            out[row["Eval Task"]] = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise BundleError(
                f"{path}: task {row['Eval Task']!r} has Random baseline {row['Random baseline']!r}, not a number"
            ) from None
    return out


def _examples(path: Path, task_type: str) -> tuple[dict, ...]:
    if not path.is_file():
        raise BundleError(f"{path}: missing (named by dataset_uri in core.yaml)")
    fields = _FIELDS[task_type]
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise BundleError(f"{path}:{number}: not valid JSON ({err})") from None
        for key, kind in fields.items():
            if not isinstance(example.get(key), kind) or isinstance(example.get(key), bool):
                raise BundleError(f"{path}:{number}: a {task_type} example needs {key!r} of type {kind.__name__}")
        options = _OPTIONS.get(task_type)
        if options and not 0 <= example["gold"] < len(example[options]):
            raise BundleError(
                f"{path}:{number}: gold={example['gold']} is not an index of its {len(example[options])} {options}"
            )
        examples.append(example)
    if not examples:
        raise BundleError(f"{path}: no examples")
    return tuple(examples)


def _common_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the common prefix of the sequences."""
    n = 0
    for column in zip(*sequences):
        if any(x != column[0] for x in column):
            break
        n += 1
    return n
