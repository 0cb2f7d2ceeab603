"""Run a study: several arms x seeds at equal training FLOPs (or equal steps), evaluate, tabulate.

    python tools/study.py --config train_configs/study_d4.toml --out outputs/schedules --seeds 0 1 \\
        --baseline-steps 400 --arm baseline=--lrt.mode=off --arm lrt= \\
        --arm refine_25="--lrt.refine_fraction=0.25" -- --training.seq_len=128

Each arm is a name and trainer overrides; the arguments after `--` apply to every arm.
`--match flops` (default) gives every arm the steps whose training FLOPs (as
`tools/plan_matched.py` counts them: the passes each step really runs) come closest to
`--baseline-steps` steps of the baseline; `--match steps` runs them all that many steps.
Runs go to OUT/<arm>-s<seed> (one thread each, `--parallel` at a time), then
`python -m titan_lrt.eval` writes OUT/<arm>-s<seed>/eval.json (every run scored on the
same held-out sequences: `--data-seed 0`); a run with its eval.json
is not run again, so a study resumes after a kill. The table (OUT/summary.md and
summary.json) gives per arm the mean and the spread (min..max) over seeds of the merged,
exact-recurrence (on the exact sample, with the merged bpb of that sample beside it) and
zero-memory bpb and the final training loss.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_matched import model_args_for_planning, steps_for_flops, tokens_per_step  # noqa: E402

from titan_lrt.config import load_config  # noqa: E402
from titan_lrt.model.accounting import run_flops, step_flops  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCORES = ("merged", "exact", "merged_on_exact_sample", "zero")


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, shlex.split(overrides)


def plan_steps(config_argv: list[str], match: str, baseline_steps: int) -> tuple[int, float]:
    """(steps, training FLOPs of the run) of an arm."""
    config, _ = load_config(config_argv)
    args, _ = model_args_for_planning(config)
    t = config.training
    if match == "flops" and args.lrt.enabled:
        budget = baseline_steps * step_flops(args, t.seq_len).baseline
        steps = steps_for_flops(args, t.seq_len, t.seed, budget)
    else:
        steps = baseline_steps
    return steps, run_flops(args, t.seq_len, steps, t.seed)[-1] * tokens_per_step(config, 1)


def run_one(folder: Path, train_argv: list[str], eval_argv: list[str], watch: tuple[list[str], list[int]]) -> dict:
    report = folder / "eval.json"
    if not report.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.log").open("w") as log:
            train = [sys.executable, str(ROOT / "run_train.sh"), *train_argv, f"--job.dump_folder={folder}"]
            done = subprocess.run(train, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if done.returncode:
            return {"folder": str(folder), "error": f"training exited {done.returncode}, see {folder}/train.log"}
        evaluate = [sys.executable, "-m", "titan_lrt.eval", "--checkpoint", str(folder), "--threads", "1"]
        evaluate += ["--no-progress", "--json", str(report), *eval_argv]
        with (folder / "eval.log").open("w") as log:
            done = subprocess.run(evaluate, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if done.returncode:
            return {"folder": str(folder), "error": f"evaluation exited {done.returncode}, see {folder}/eval.log"}
    scores = json.loads(report.read_text())["bpb"]["scores"]
    result = {"folder": str(folder), **{k: scores[k]["bpb"] for k in SCORES if k in scores}}
    result["train_loss"] = final_train_loss(folder)
    result["signals"] = signals(folder, *watch)
    return result


def logged(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tb"))
    acc.Reload()
    return acc


def signals(folder: Path, tags: list[str], steps: list[int]) -> dict[str, float]:
    """ "tag@step" -> the value logged at the last logged step <= step (early statistics of a run)."""
    acc, out = logged(folder), {}
    for tag in tags:
        if tag not in acc.Tags()["scalars"]:
            continue
        events = acc.Scalars(tag)
        for step in steps:
            before = [e.value for e in events if e.step <= step]
            if before:
                out[f"{tag}@{step}"] = before[-1]
    return out


def final_train_loss(folder: Path, last: int = 5) -> float | None:
    """Mean merged training loss of the last `last` logged steps (total loss for runs without passes)."""
    acc = logged(folder)
    tags = acc.Tags()["scalars"]
    tag = "loss/merged" if "loss/merged" in tags else "loss/total"
    if tag not in tags:
        return None
    values = [e.value for e in acc.Scalars(tag)][-last:]
    return sum(values) / len(values)


def summarise(arms: dict[str, dict], seeds: list[int]) -> str:
    lines = [
        "| arm | steps | FLOPs | " + " | ".join(f"{s} bpb" for s in SCORES) + " | train loss | seeds |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in SCORES) + " | ---: | ---: |",
    ]
    for name, arm in arms.items():
        runs = [r for r in arm["runs"] if "error" not in r]
        cells = []
        for key in (*SCORES, "train_loss"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if not values:
                cells.append("-")
                continue
            mean = sum(values) / len(values)
            spread = f" ({min(values):.4f}..{max(values):.4f})" if len(values) > 1 else ""
            cells.append(f"{mean:.4f}{spread}")
        lines.append(f"| {name} | {arm['steps']:,} | {arm['flops']:.3e} | " + " | ".join(cells) + f" | {len(runs)} |")
    for name, arm in arms.items():
        for r in arm["runs"]:
            if "error" in r:
                lines.append(f"\nerror in {name}: {r['error']}")
    keys = sorted({k for arm in arms.values() for r in arm["runs"] for k in r.get("signals", {})})
    if keys:
        lines += ["", "| run | merged bpb | train loss | " + " | ".join(keys) + " |"]
        lines.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |")
        for arm in arms.values():
            for r in arm["runs"]:
                values = [r.get("signals", {}).get(k) for k in keys]
                cells = ["-" if v is None else f"{v:.4g}" for v in values]
                loss = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
                lines.append(
                    f"| {Path(r['folder']).name} | {r.get('merged', float('nan')):.4f} | {loss} | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", action="append", required=True, help='NAME="--key=value ..." (repeat)')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--baseline-steps", type=int, required=True)
    parser.add_argument("--match", choices=("flops", "steps"), default="flops")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--eval-args", default="--batches 16 --batch-size 8 --exact-sequences 16 --data-seed 0")
    parser.add_argument(
        "--signals", nargs="*", default=[], help="TensorBoard tags to report per run (early statistics)"
    )
    parser.add_argument("--signal-steps", type=int, nargs="*", default=[], help="steps at which to report --signals")
    args = parser.parse_args(own)
    out = Path(args.out)
    base = ["--config", args.config, *common]
    arms: dict[str, dict] = {}
    jobs = []
    for text in args.arm:
        name, overrides = parse_arm(text)
        steps, flops = plan_steps(base + overrides, args.match, args.baseline_steps)
        arms[name] = {"overrides": overrides, "steps": steps, "flops": flops, "runs": []}
        for seed in args.seeds:
            train_argv = [*base, *overrides, f"--training.steps={steps}", f"--training.seed={seed}"]
            jobs.append((name, out / f"{name}-s{seed}", train_argv))
    print(f"{len(jobs)} runs: " + ", ".join(f"{n} {a['steps']} steps" for n, a in arms.items()), flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        watch = (args.signals, args.signal_steps)
        futures = [
            (name, pool.submit(run_one, folder, argv, shlex.split(args.eval_args), watch))
            for name, folder, argv in jobs
        ]
        for name, future in futures:
            result = future.result()
            arms[name]["runs"].append(result)
            print(f"{name}: {result}", flush=True)
    table = summarise(arms, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"argv": argv, "arms": arms}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
