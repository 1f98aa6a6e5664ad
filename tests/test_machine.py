"""The dtype chosen for the machine (--dtype auto)."""

from __future__ import annotations

import torch

from twotower import machine


def test_auto_dtype_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert machine.native_bf16() and all(machine.auto_dtype(m) == torch.bfloat16 for m in ("ar", "verify", None))
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not machine.native_bf16()
    assert machine.auto_dtype("ar") == machine.auto_dtype("mock-ar") == torch.bfloat16
    assert machine.auto_dtype("verify") == machine.auto_dtype("diffusion") == torch.float32
    assert machine.describe() == {"native_bf16": False, "cpu_bf16_flags": []}


def test_cpu_flags_are_read_from_the_machine():
    flags = machine.cpu_flags()
    assert isinstance(flags, frozenset) and (not flags or "fpu" in flags or "sse2" in flags or "avx" in flags)
