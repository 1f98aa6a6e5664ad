"""The machine's arithmetic, and the weight dtype chosen for it (`--dtype auto`).

A CPU with native bf16 (AVX512-BF16 or AMX) multiplies bf16 matrices several times faster than
fp32 ones, and a pass over 16 positions costs about what a pass over one does; without it,
PyTorch converts bf16 in software, so every extra position of a pass costs: there bf16 still
makes the fastest one-position passes (AR mode reads half the bytes), while passes over many
positions (verify, diffusion) are cheaper in fp32. The rule, measured on both kinds of CPU
(`twotower bench` prints the pass-cost table by dtype; the figures: docs/benchmarks.md):

    GPU, or CPU with native bf16            bf16 for every mode
    CPU without native bf16                 bf16 for ar / mock-ar, fp32 for diffusion / verify

`--dtype bf16|fp32|fp16` overrides it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MULTI_POSITION_MODES = ("diffusion", "verify")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether bf16 matrix products run natively: a GPU, or a CPU with AVX512-BF16 or AMX."""
    return torch.cuda.is_available() or bool(cpu_flags() & set(NATIVE_BF16_FLAGS))


def auto_dtype(mode: str | None = None) -> torch.dtype:
    """The weight dtype for a mode on this machine (the rule in the module docstring)."""
    if native_bf16() or mode not in MULTI_POSITION_MODES:
        return torch.bfloat16
    return torch.float32


def describe() -> dict:
    """What a report records about the machine's arithmetic."""
    return {"native_bf16": native_bf16(), "cpu_bf16_flags": sorted(cpu_flags() & set(NATIVE_BF16_FLAGS))}
