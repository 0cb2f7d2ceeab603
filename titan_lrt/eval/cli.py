"""Evaluate a trained checkpoint: bits per byte (per pass, merged, exact, zero memory), ICL tasks, CORE.

python -m titan_lrt.eval --checkpoint outputs/debug_model/checkpoints/step-00000200
python -m titan_lrt.eval --checkpoint <step folder> --modes merged,exact --batches 4 --icl --json eval.json
python -m titan_lrt.eval --checkpoint <step folder> --modes none --core ~/eval_bundle --core-max-per-task 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from titan_lrt.data.corpus import ensure_stdlib_corpus
from titan_lrt.data.loader import build_dataloader
from titan_lrt.eval.bpb import MODES, evaluate_bpb
from titan_lrt.eval.core import evaluate_core
from titan_lrt.eval.core_bundle import load_bundle
from titan_lrt.eval.icl import evaluate_icl
from titan_lrt.eval.icl_tasks import TASKS, TaskAlphabet
from titan_lrt.eval.logits import LOGIT_MODES, model_predictor
from titan_lrt.eval.report import format_report
from titan_lrt.export import LoadedModel, load_model


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m titan_lrt.eval", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint step folder (…/checkpoints/step-N), a folder of them or a run folder (newest), "
        "or an exported model (folder or .pt)",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json of a DCP checkpoint (default: the run's, see titan_lrt.export.checkpoint_tokenizer)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="autocast dtype of the forward passes"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads of torch (default: torch's; 1 is fastest for small models on a busy machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="also write the report as JSON to this file")
    g = p.add_argument_group("bits per byte")
    g.add_argument("--data", help='held-out data: "stdlib" or a local file/folder (default: the run\'s data)')
    g.add_argument("--split", default="validation", help="dataset split (default: validation)")
    g.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of the held-out sample (default: the run's training.seed); give one value to score "
        "runs of different seeds on the same sequences",
    )
    g.add_argument(
        "--modes", default="merged,passes,exact,zero", help=f"comma-separated from {','.join(MODES)}, or none"
    )
    g.add_argument("--batches", type=int, default=8, help="batches to score (default: 8)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's training.seq_len)")
    g.add_argument("--exact-sequences", type=int, help="sequences scored by exact recurrence (default: one batch)")
    g = p.add_argument_group("in-context learning")
    g.add_argument("--icl", action="store_true", help=f"score the synthetic ICL tasks ({', '.join(TASKS)})")
    g.add_argument("--icl-examples", type=int, default=64, help="examples per task (default: 64)")
    g.add_argument("--icl-modes", default="exact,zero,schedule", help=f"comma-separated from {','.join(LOGIT_MODES)}")
    g.add_argument("--icl-seed", type=int, default=0)
    g = p.add_argument_group("CORE")
    g.add_argument(
        "--core",
        metavar="BUNDLE",
        help="folder of a DCLM-format eval bundle (core.yaml, eval_data/, eval_meta_data.csv)",
    )
    g.add_argument("--core-tasks", help="comma-separated task labels (default: all in core.yaml)")
    g.add_argument(
        "--core-mode", default="schedule", choices=LOGIT_MODES, help="how the model scores (default: schedule)"
    )
    g.add_argument("--core-max-per-task", type=int, default=0, help="examples per task, a fixed random subset (0: all)")
    args = p.parse_args(argv)
    args.modes = [] if args.modes == "none" else _choices(p, "--modes", args.modes, MODES)
    args.icl_modes = _choices(p, "--icl-modes", args.icl_modes, LOGIT_MODES)
    for name in ("batches", "batch_size", "icl_examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (FileNotFoundError, ValueError) as err:  # a bad path, bundle or setting: say it without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.checkpoint, device, args.tokenizer)
    core_tasks = None
    if args.core:  # read the bundle before any long work, so that a bad one fails at once
        core_tasks = load_bundle(args.core, args.core_tasks.split(",") if args.core_tasks else None)
    amp = _autocast(args.dtype, device)
    report = {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "model": _describe(loaded),
        "device": device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
    }
    progress = not args.no_progress
    if args.modes:
        report["bpb"] = _bits_per_byte(args, loaded, amp, progress)
    predictors = {mode: model_predictor(loaded.model, mode, amp) for mode in LOGIT_MODES}
    if args.icl:
        alphabet = TaskAlphabet.from_tokenizer(loaded.tokenizer)
        scores = evaluate_icl(
            {m: predictors[m] for m in args.icl_modes},
            alphabet,
            examples=args.icl_examples,
            seed=args.icl_seed,
            progress=progress,
        )
        tasks = {task: {m: s.to_dict() for m, s in by_mode.items()} for task, by_mode in scores.items()}
        report["icl"] = {
            "examples": args.icl_examples,
            "seed": args.icl_seed,
            "symbols": len(alphabet.symbols),
            "tasks": tasks,
        }
    if core_tasks:
        result = evaluate_core(
            predictors[args.core_mode],
            core_tasks,
            loaded.tokenizer,
            loaded.model.args.max_seq_len,
            args.core_max_per_task,
            progress,
        )
        report["core"] = {
            "bundle": str(args.core),
            "mode": args.core_mode,
            "max_per_task": args.core_max_per_task,
            **result.to_dict(),
        }
    return report


def _bits_per_byte(args, loaded: LoadedModel, amp, progress: bool) -> dict:
    config, model = loaded.config, loaded.model
    seq_len = args.seq_len or config.training.seq_len
    if seq_len > model.args.max_seq_len:
        raise ValueError(f"--seq-len={seq_len}: the model covers max_seq_len={model.args.max_seq_len}")
    data = args.data or config.data.dataset
    source = ensure_stdlib_corpus(config.data.corpus_path, show_progress=progress) if data == "stdlib" else data
    loader = build_dataloader(
        source,
        tokenizer=loaded.tokenizer,
        seq_len=seq_len,
        local_batch_size=args.batch_size,
        split=args.split,
        text_column=config.data.text_column,
        num_streams=1,
        packing="concat",
        seed=config.training.seed if args.data_seed is None else args.data_seed,
        num_workers=0,
        streaming=config.data.streaming,
    )
    device = model.rope_cos.device
    batches = (tuple(x.to(device) for x in b) for _, b in zip(range(args.batches), loader))
    batches = tqdm(batches, total=args.batches, desc="bits per byte", disable=not progress)
    exact = args.batch_size if args.exact_sequences is None else args.exact_sequences
    result = evaluate_bpb(model, batches, loaded.tokenizer.token_bytes().to(device), exact, amp, args.modes)
    exact_tokens = result.throughput["exact"].tokens if "exact" in result.throughput else 0
    data_info = {
        "source": str(data),
        "split": args.split,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "exact_sequences": exact_tokens // seq_len,
    }
    return {"data": data_info, "modes": args.modes, **result.to_dict(seq_len)}


def _describe(loaded: LoadedModel) -> dict:
    a = loaded.model.args
    lrt = a.lrt
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "describe": f"LRT {lrt.describe()}, {a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size}, "
        f"{params / 1e6:.2f}M parameters",
        "lrt_mode": lrt.mode,
        "n_layers": a.n_layers,
        "dim": a.dim,
        "vocab_size": a.vocab_size,
        "max_seq_len": a.max_seq_len,
        "parameters": params,
    }


def _autocast(dtype: str, device: str):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bfloat16" else None


def _choices(parser: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    if not chosen or any(c not in allowed for c in chosen):
        parser.error(f"{flag}={text!r}: allowed a comma-separated list of {', '.join(allowed)}")
    return chosen
