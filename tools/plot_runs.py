"""Plot training runs side by side from their TensorBoard logs (PNG files).

    python tools/plot_runs.py outputs/debug_model outputs/debug_baseline --labels LRT baseline --out plots/
    python tools/plot_runs.py outputs/*-lrt outputs/*-baseline-equal-compute --smooth 0.8 --logx

Each run is a dump folder (its TensorBoard folder is found below it) or a
TensorBoard folder. Figures, each written when at least one run has its data:

- loss.png: training loss (merged, i.e. each position scored by the last pass
  that computed it; the total loss for runs without it) against tokens seen and
  against the cumulative training FLOPs the run logged (flops/seen: every pass
  that ran, so cheaper schedules are placed by what they spent);
- bpb.png: validation bits per byte, merged (solid) and exact recurrence
  (dashed), against tokens and against cumulative training FLOPs;
- pass_losses.png: the loss of every pass, one panel per run;
- merged_vs_exact.png: validation bpb of merged minus exact (the train/inference
  gap) and training loss of merged minus pass 0, against tokens.

A run without a tag is left out of the panels that need it (and says so).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENS = "throughput/tokens_seen"
COMPUTE = "flops/seen"
X_AXES = {TOKENS: "tokens seen", COMPUTE: "training FLOPs (what ran, cumulative)"}


@dataclass
class Run:
    label: str
    folder: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]
    """tag -> (steps, values), one value per step (the last one logged, e.g. after a resume)."""

    def has(self, tag: str) -> bool:
        return tag in self.scalars

    def first(self, tags: tuple[str, ...]) -> str | None:
        """The first of `tags` this run logged."""
        return next((t for t in tags if t in self.scalars), None)

    def series(self, tag: str, x_tag: str, smooth: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Values of `tag` against the value of `x_tag` at the same steps."""
        steps, values = self.scalars[tag]
        x_steps, x_values = self.scalars[x_tag]
        return _interp_extend(steps, x_steps, x_values), _ema(values, smooth)


def tensorboard_folder(path: Path) -> Path:
    """`path` if it holds event files, else the one folder below it that does."""
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
    folders = sorted({p.parent for p in path.rglob("events.out.tfevents.*")})
    if path in folders:
        return path
    if len(folders) != 1:
        found = ", ".join(str(f) for f in folders) or "none"
        raise ValueError(
            f"{path}: expected one folder of TensorBoard event files below it, found {found}; give that folder itself"
        )
    return folders[0]


def read_run(path: str | Path, label: str | None = None) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    path = Path(path)
    folder = tensorboard_folder(path)
    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()[SCALARS]:
        last = {event.step: event.value for event in accumulator.Scalars(tag)}
        steps = np.array(sorted(last), dtype=np.int64)
        scalars[tag] = (steps, np.array([last[s] for s in steps], dtype=np.float64))
    return Run(label or _default_label(path, folder), folder, scalars)


def pass_tags(run: Run) -> list[str]:
    return sorted((t for t in run.scalars if re.fullmatch(r"loss/pass\d+", t)), key=lambda t: int(t[9:]))


def plot_all(runs: list[Run], out: Path, smooth: float = 0.0, logx: bool = False) -> list[Path]:
    """Write every figure some run has data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    written = []

    def panel(ax, title, ylabel, x_tag, curves):
        """curves: (tags, linestyle, suffix, smooth), drawn for every run that has one of the tags
        (the first it has) and x_tag."""
        drawn = False
        for run in runs:
            for tags, style, suffix, s in curves:
                tag = run.first(tags)
                if tag is None:
                    continue
                if not run.has(x_tag):
                    print(f"note: {run.label} has no {x_tag}: left out of '{title}'", file=sys.stderr)
                    continue
                x, y = run.series(tag, x_tag, s)
                ax.plot(x, y, style, color=colors[run.label], label=run.label + suffix)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x_tag])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if logx:
            ax.set_xscale("log")
        if drawn:
            ax.legend(fontsize=8)
        return drawn

    def save(fig, name, drawn):
        if drawn:
            path = out / name
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            written.append(path)
        else:
            print(f"skipped {name}: no run has its data", file=sys.stderr)
        plt.close(fig)

    loss = [(("loss/merged", "loss/total"), "-", "", smooth)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = [
        panel(axes[0], "training loss (merged)", "nats per token", TOKENS, loss),
        panel(axes[1], "training loss (merged) at equal compute", "nats per token", COMPUTE, loss),
    ]
    save(fig, "loss.png", any(drawn))

    bpb = [(("val/bpb_merged",), "-o", " merged", 0.0), (("val/bpb_exact",), "--s", " exact", 0.0)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = [
        panel(axes[0], "validation bits per byte", "bpb", TOKENS, bpb),
        panel(axes[1], "validation bits per byte at equal compute", "bpb", COMPUTE, bpb),
    ]
    save(fig, "bpb.png", any(drawn))

    with_passes = [run for run in runs if pass_tags(run) and run.has(TOKENS)]
    fig, axes = plt.subplots(1, max(1, len(with_passes)), figsize=(6 * max(1, len(with_passes)), 4.5), squeeze=False)
    for ax, run in zip(axes[0], with_passes):
        for i, tag in enumerate(pass_tags(run)):
            ax.plot(*run.series(tag, TOKENS, smooth), "-", color=f"C{i}", label=tag.split("/")[1])
        if run.has("loss/merged"):
            ax.plot(*run.series("loss/merged", TOKENS, smooth), "k--", label="merged")
        ax.set_title(f"{run.label}: loss of each pass")
        ax.set_xlabel(X_AXES[TOKENS])
        ax.set_ylabel("nats per token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if logx:
            ax.set_xscale("log")
    save(fig, "pass_losses.png", bool(with_passes))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = [
        panel(
            axes[0],
            "validation: merged minus exact",
            "bpb difference",
            TOKENS,
            [(("val/bpb_merged_minus_exact",), "-o", "", 0.0)],
        ),
        panel(
            axes[1],
            "training: merged minus pass 0",
            "loss difference (nats)",
            TOKENS,
            [(("loss/merged_minus_pass0",), "-", "", smooth)],
        ),
    ]
    for ax in axes:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    save(fig, "merged_vs_exact.png", any(drawn))
    return written


def _default_label(path: Path, tb_folder: Path) -> str:
    """The run's folder name (the dump folder's, when given its TensorBoard folder)."""
    path = path.resolve()
    return path.parent.name if path == tb_folder.resolve() and path.name == "tb" else path.name


def _interp_extend(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Linear interpolation through (0, 0) and the points (xp, fp), continued past the last one
    along the last segment (eval steps between or after logged steps)."""
    if xp[0] > 0:
        xp, fp = np.concatenate([[0], xp]), np.concatenate([[0.0], fp])
    y = np.interp(x, xp, fp)
    if len(xp) > 1:
        slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        y = np.where(x > xp[-1], fp[-1] + slope * (x - xp[-1]), y)
    return y


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential smoothing, debiased (weight 0: unchanged)."""
    if weight <= 0:
        return values
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="dump folders or TensorBoard folders")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the folder names)")
    parser.add_argument("--out", default="plots", help="folder for the PNG files (default: %(default)s)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight for training curves, in [0, 1)")
    parser.add_argument("--logx", action="store_true", help="logarithmic x axes")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs")
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth={args.smooth}: must be in [0, 1)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install -e '.[plots]'", file=sys.stderr)
        return 2
    try:
        runs = [read_run(path, label) for path, label in zip(args.runs, args.labels or [None] * len(args.runs))]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in plot_all(runs, Path(args.out), args.smooth, args.logx):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
