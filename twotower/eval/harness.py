"""`twotower eval` and `twotower bench`: quality retention and speed, side by side, one process.

Every operating point (mode, block size, threshold, temperature) runs the same prompts on the
same weights and dtype; AR greedy always runs first and is the reference for accuracy ratios,
agreement and speed-ups. The measurement API in one import: operating points (`points.py`),
quality (`quality.py`), speed (`speed.py`) and what is printed and written (`report.py`).
"""

from __future__ import annotations

from twotower.eval.points import AR, OperatingPoint, Reply, generate_replies, operating_points
from twotower.eval.quality import run_eval
from twotower.eval.report import environment, format_table, plot_curve, write_json
from twotower.eval.speed import pass_cost, run_bench

__all__ = [
    "AR",
    "OperatingPoint",
    "Reply",
    "environment",
    "format_table",
    "generate_replies",
    "operating_points",
    "pass_cost",
    "plot_curve",
    "run_bench",
    "run_eval",
    "write_json",
]
