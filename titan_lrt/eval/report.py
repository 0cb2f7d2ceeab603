"""The evaluation report as readable tables; it formats the same dict that is written as JSON."""

from __future__ import annotations

from typing import Optional, Sequence

SCORE_LABELS = {"merged_on_exact_sample": "merged (exact sample)"}
THROUGHPUT_LABELS = {
    "schedule": "schedule (merged + passes)",
    "exact": "exact (KV-cache decoding)",
    "zero": "zero memory",
}


def format_report(report: dict) -> str:
    m = report["model"]
    lines = [
        f"checkpoint {report['checkpoint']} (step {report['step']}): {m['describe']}",
        f"device {report['device']} ({report['threads']} CPU threads), {report['dtype']}",
    ]
    if "bpb" in report:
        lines += ["", *_bpb_lines(report["bpb"])]
    if "icl" in report:
        lines += ["", *_icl_lines(report["icl"])]
    if "core" in report:
        lines += ["", *_core_lines(report["core"])]
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]


def _bpb_lines(bpb: dict) -> list[str]:
    d = bpb["data"]
    lines = [
        f"bits per byte on {d['source']} ({d['split']}): {d['batches']} batches of {d['batch_size']} x "
        f"{d['seq_len']} tokens, exact recurrence on {d['exact_sequences']} sequences"
    ]
    scores = bpb["scores"]
    if scores:
        buckets = next(iter(scores.values()))["buckets"]
        header = ["", "all", *(f"pos {b['positions']}" for b in buckets)]
        rows = [
            [
                SCORE_LABELS.get(name, name),
                _num(s["bpb"]),
                *(_num(b["bpb"] if b["bytes"] else None) for b in s["buckets"]),
            ]
            for name, s in scores.items()
        ]
        lines += table(header, rows)
    if bpb["merged_minus_exact"] is not None:
        lines.append(f"merged - exact (same sequences): {bpb['merged_minus_exact']:+.4f} bpb")
    rows = [
        [THROUGHPUT_LABELS.get(kind, kind), str(t["tokens"]), f"{t['seconds']:.2f}", f"{t['tokens_per_s']:.0f}"]
        for kind, t in bpb["throughput"].items()
    ]
    if rows:
        lines += ["", *table(["evaluation speed", "tokens", "seconds", "tokens/s"], rows)]
    return lines


def _icl_lines(icl: dict) -> list[str]:
    tasks = icl["tasks"]
    modes = list(next(iter(tasks.values())))
    lines = [
        f"in-context learning ({icl['examples']} examples per task, seed {icl['seed']}): "
        "accuracy over the answer's candidates / top-1 over the vocabulary"
    ]
    rows = [
        [
            task,
            *(f"{s[m]['choice_accuracy']:.3f} / {s[m]['accuracy']:.3f}" for m in modes),
            f"{s[modes[0]]['chance']:.3f}",
        ]
        for task, s in tasks.items()
    ]
    return lines + table(["task", *modes, "chance"], rows)


def _core_lines(core: dict) -> list[str]:
    lines = [f"CORE ({core['bundle']}, {core['mode']} mode)"]
    rows = [
        [label, str(t["examples"]), f"{t['accuracy']:.3f}", f"{t['random_baseline']:.3f}", f"{t['centered']:+.3f}"]
        for label, t in core["tasks"].items()
    ]
    rows.append(["CORE", "", "", "", f"{core['core']:+.3f}"])
    return lines + table(["task", "examples", "accuracy", "random", "centered"], rows)


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"
