"""Plan an LRT run and its matched baselines: equal data and equal training compute.

    python tools/plan_matched.py --config train_configs/debug_model.toml --tokens 2e7
    python tools/plan_matched.py --config train_configs/lrt_1b.toml --flops 1e20 --ranks 64
    python tools/plan_matched.py --config train_configs/lrt_d12.toml --tokens-per-param 20 --lrt.num_subsets=4

The config and its --section.key=value overrides are read as the trainer reads
them. The budget sets the LRT run: a number of tokens, of training FLOPs, or of
tokens per parameter of the LRT model (all its parameters, embeddings
included). Then:

- baseline, equal data: the same backbone with --lrt.mode=off for as many steps
  (the same tokens);
- baseline, equal compute: as many training FLOPs as the LRT run, i.e. more steps.

FLOPs are the ones the trainer reports (`step_flops`: every pass the schedule
really runs, forward + backward, attention included), summed over the steps as
the schedule options choose them (`run_flops`: refine_fraction, start_step,
pass0_backward, jacobi_mix), so a cheaper schedule gets its own equal-compute
baseline. Steps are rounded to whole steps, so the printed FLOPs show how close
the match is. The warmup is
a number of steps and the decay a fraction of the run in the LR schedule, so a
longer baseline keeps the same warmup and a proportionally longer decay. Each
run gets its own dump folder, so that a baseline never resumes from the LRT's
checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from titan_lrt.config import Config, ConfigError, load_config
from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.model.accounting import count_parameters, run_flops, step_flops
from titan_lrt.model.args import ModelArgs

BUDGETS = ("tokens", "flops", "tokens_per_param")


@dataclass
class PlannedRun:
    name: str
    description: str
    steps: int
    tokens_per_step: int
    flops_per_token: float
    parameters: int
    overrides: list[str]

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token


def tokens_per_step(config: Config, ranks: int) -> int:
    t = config.training
    return (t.global_batch_size or t.local_batch_size * ranks) * t.seq_len


def plan(config: Config, args: ModelArgs, budget: str, amount: float, ranks: int = 1) -> list[PlannedRun]:
    """The LRT run the budget buys, then the baselines with its data and with its FLOPs."""
    if not args.lrt.enabled:
        raise ValueError("the config has lrt.mode='off': give an LRT config (interleaved or jacobi) to match against")
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r}: allowed {BUDGETS}")
    if amount <= 0:
        raise ValueError(f"budget {budget}={amount}: must be > 0")
    per_step = tokens_per_step(config, ranks)
    seq_len, seed = config.training.seq_len, config.training.seed
    flops = step_flops(args, seq_len)
    params = count_parameters(args)
    if budget == "flops":
        lrt_steps = steps_for_flops(args, seq_len, seed, amount / per_step)
    else:
        tokens = amount if budget == "tokens" else amount * params.total
        lrt_steps = max(1, round(tokens / per_step))
    lrt_flops_per_token = run_flops(args, seq_len, lrt_steps, seed)[-1] / lrt_steps
    dump = config.job.dump_folder.rstrip("/")

    def run(name, description, steps, flops_per_token, parameters, extra):
        overrides = [f"--training.steps={steps}", f"--job.dump_folder={dump}-{name}", *extra]
        return PlannedRun(name, description, steps, per_step, flops_per_token, parameters, overrides)

    lrt = run("lrt", "LRT", lrt_steps, lrt_flops_per_token, params.total, [])
    equal_compute_steps = max(1, round(lrt.flops / (flops.baseline * per_step)))
    return [
        lrt,
        run(
            "baseline-equal-data",
            "baseline, equal data",
            lrt_steps,
            flops.baseline,
            params.backbone,
            ["--lrt.mode=off"],
        ),
        run(
            "baseline-equal-compute",
            "baseline, equal compute",
            equal_compute_steps,
            flops.baseline,
            params.backbone,
            ["--lrt.mode=off"],
        ),
    ]


def steps_for_flops(args: ModelArgs, seq_len: int, seed: int, flops_per_token_of_a_step: float) -> int:
    """The number of steps whose cumulative FLOPs (per token of one step's batch) come closest to the target."""
    average = run_flops(args, seq_len, 1_000, seed)[-1] / 1_000
    guess = max(1, round(flops_per_token_of_a_step / average))
    cumulative = run_flops(args, seq_len, 2 * guess + 10, seed)
    return 1 + min(range(len(cumulative)), key=lambda i: abs(cumulative[i] - flops_per_token_of_a_step))


def model_args_for_planning(config: Config) -> tuple[ModelArgs, str]:
    """The model arguments the trainer would build, and where the vocabulary size came from."""
    path = Path(config.model.tokenizer_path)
    if path.is_file():
        tokenizer = Tokenizer.from_file(path)
        return config.model_args(tokenizer.vocab_size, tokenizer.bos_id), f"tokenizer {path}"
    source = f"model.vocab_size; no tokenizer at {path} yet, the trainer would train one of this size"
    return config.model_args(config.model.vocab_size, 0), source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="%(prog)s --config FILE (--tokens N | --flops F | --tokens-per-param R) [--ranks N] "
        "[--section.key=value ...]",
    )
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=float, help="training tokens of the LRT run")
    budget.add_argument("--flops", type=float, help="training FLOPs of the LRT run")
    budget.add_argument("--tokens-per-param", type=float, help="training tokens per LRT parameter")
    parser.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="data-parallel ranks, for the batch when training.global_batch_size is 0 (default: 1)",
    )
    known, trainer_argv = parser.parse_known_args(argv)
    if known.ranks < 1:
        parser.error(f"--ranks={known.ranks}: must be >= 1")
    kind = next(k for k in BUDGETS if getattr(known, k) is not None)
    try:
        config, _ = load_config(trainer_argv)
        args, vocab_source = model_args_for_planning(config)
        runs = plan(config, args, kind, getattr(known, kind), known.ranks)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    lrt, t = runs[0], config.training
    flops = step_flops(args, t.seq_len)
    average = lrt.flops_per_token
    batch = t.global_batch_size or t.local_batch_size * known.ranks
    print(f"budget: {getattr(known, kind):.4g} {kind.replace('_', ' ')}")
    print(
        f"model: {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size} (from {vocab_source}); "
        f"LRT mode {args.lrt.describe()}"
    )
    print(f"batch: {batch} sequences x {t.seq_len} tokens = {lrt.tokens_per_step:,} tokens per step")
    print(
        f"training FLOPs per token: LRT {flops.total:.4g} per refining step, {average:.4g} on average over its "
        f"{lrt.steps:,} steps; baseline {flops.baseline:.4g} (ratio {average / flops.baseline:.4f})"
    )
    print()
    print(f"{'run':<26}{'steps':>12}{'tokens':>18}{'FLOPs':>12}{'FLOPs/LRT':>11}{'params':>13}{'tokens/param':>14}")
    for r in runs:
        print(
            f"{r.description:<26}{r.steps:>12,}{r.tokens:>18,}{r.flops:>12.4g}{r.flops / lrt.flops:>11.4f}"
            f"{r.parameters:>13,}{r.tokens / r.parameters:>14.2f}"
        )
    print()
    base_command = ["./run_train.sh", *trainer_argv]
    for r in runs:
        print(f"# {r.description}")
        print(shlex.join(base_command + r.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
