"""A dry run of scripts/gpu_train.sh end to end on the CPU with a tiny model, so that the GPU
script cannot rot: setup, distill, both training runs (the real presets, made tiny by flags),
measure, pack; then the packed checkpoints reassemble and load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_backbone, tiny_tokenizer

from twotower import TwoTowerForCausalLM, generate_verify

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_train.sh"
sys.path.insert(0, str(SCRIPT.parent))
from parts import reassemble, split  # noqa: E402  (scripts/parts.py: a tool, not part of the package)

TINY_TRAIN = (
    "--max-steps 3 --batch-size 2 --block-size 4 --blocks-per-sequence 2 --eval-every 2 --eval-sequences 1 "
    "--lora-rank 4 --lora-alpha 8 --nfe-prompts 1 --save-every 1 --dtype fp32 --mixed-precision no"
)


def test_gpu_script_dry_run_on_cpu(tmp_path):
    model = tmp_path / "tiny"
    tiny_tokenizer().save_pretrained(model)
    tiny_backbone().save_pretrained(model)
    env = {
        **os.environ,
        "WORK": str(tmp_path / "work"),
        "OUT": str(tmp_path / "out"),
        "MODEL": str(model),
        "PY": sys.executable,
        "MINUTES": "5",
        "ROWS": "10",
        "DISTILL_BATCH": "5",
        "DISTILL_FLAGS": "--max-prompt-tokens 4 --max-answer-tokens 12 --dtype fp32",
        "TRAIN_FLAGS": TINY_TRAIN,
        "SHALLOW_FLAGS": "--denoiser-depth 1",
        "MEASURE_FLAGS": "--num-prompts 2 --max-new-tokens 8 --dtype fp32 --no-hf",
        "PART_MB": "0.05",  # parts of 50 KiB, so that a checkpoint comes in several
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(["bash", str(SCRIPT), "all"], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = tmp_path / "out"
    for run, depth in (("shallow", 1), ("full", 2)):
        log = [json.loads(line) for line in (out / f"{run}-log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3] and "tokens_per_nfe" in log[1]
        manifest = json.loads((out / run / "parts.json").read_text())
        assert len(manifest["files"]["denoiser.safetensors"]["parts"]) > 1
        assert all((out / run / p).stat().st_size <= 0.05 * 2**20 for e in manifest["files"].values() for p in e["parts"])
        checkpoint = reassemble(out / run, tmp_path / f"{run}-checkpoint")
        trained = TwoTowerForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        assert len(trained.denoiser.aligned) == depth and trained.config.trained_tokens > 0
        assert generate_verify(trained, [[5, 6, 7]], max_new_tokens=6).new_tokens == 6
        bench = json.loads((out / f"bench-{run}.json").read_text())
        assert {r["point"] for r in bench["rows"]} >= {"ar", "diffusion S=4 g=0.8", "verify S=4 g=0.8"}
    rows = (tmp_path / "work" / "data" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 10 and (tmp_path / "work" / "data" / "index.json").is_file()


def test_reassemble_refuses_missing_or_damaged_parts(tmp_path):
    import pytest

    from twotower import TwoTowerError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "empty.json").write_text("")
    split(folder, tmp_path / "parts", max_mb=1 / 1024)  # 1 KiB parts
    assert reassemble(tmp_path / "parts", tmp_path / "back").joinpath("a.bin").read_bytes() == (folder / "a.bin").read_bytes()
    assert (tmp_path / "back" / "empty.json").read_text() == ""
    damaged = tmp_path / "parts" / "a.bin.part003"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
    with pytest.raises(TwoTowerError, match="does not match its manifest"):
        reassemble(tmp_path / "parts", tmp_path / "again")
    damaged.unlink()
    with pytest.raises(TwoTowerError, match=r"part a\.bin\.part003 of a\.bin is missing"):
        reassemble(tmp_path / "parts", tmp_path / "again")
    assert not (tmp_path / "again").exists()
