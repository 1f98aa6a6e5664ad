"""What a measurement prints and writes: the environment it ran in, fixed-width tables, the
JSON report (written atomically) and the speed / quality plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch


def environment(dtype: torch.dtype, model_ref: str, weights: str = "dense") -> dict:
    import transformers

    from twotower.machine import describe

    return {
        "command": " ".join(["twotower", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("twotower") else " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": weights,
        "model": model_ref,
        **describe(),
    }


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Fixed-width text table; columns: (header, key). Floats print with 3 significant places."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    body = [[cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, (h, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)


def plot_curve(points: list[dict], path: str) -> str | None:
    """tokens/s against quality retention, one line per block size. Returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'twotower[bench]')"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, group in _group_by_block(points).items():
        group = sorted(group, key=lambda p: p["threshold"])
        ax.plot([p["retention"] * 100 for p in group], [p["tokens_per_second"] for p in group], "o-", label=label)
        for p in group:
            ax.annotate(f"{p['threshold']}", (p["retention"] * 100, p["tokens_per_second"]), fontsize=7)
    for p in points:
        if p["mode"] != "diffusion":
            ax.scatter([p["retention"] * 100], [p["tokens_per_second"]], marker="s")
            ax.annotate(p["mode"], (p["retention"] * 100, p["tokens_per_second"]), fontsize=8)
    ax.set_xlabel("quality retention vs AR (%)")
    ax.set_ylabel("tokens / s")
    ax.set_title("speed / quality (labels: confidence threshold)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _group_by_block(points: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in points:
        if p["mode"] == "diffusion" and p.get("retention") is not None:
            groups.setdefault(f"block {p['block_size']}", []).append(p)
    return groups
