"""Training under `accelerate launch` with two CPU processes (DDP over gloo) on a tiny model:
the same losses and gradient norms as one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_backbone, tiny_tokenizer
from test_train import _write_data

from twotower import TwoTowerError
from twotower.train import TrainConfig, train

ARGS = ["--block-size", "4", "--blocks-per-sequence", "3", "--batch-size", "4", "--max-steps", "4", "--eval-every", "0",
        "--eval-sequences", "2", "--save-every", "2", "--lora-rank", "4", "--dtype", "fp32"]  # fmt: skip


def _run(tmp_path, out, processes: int):
    folder = tmp_path / "tiny"
    if not folder.exists():
        tiny_tokenizer().save_pretrained(folder)
        tiny_backbone().save_pretrained(folder)
        _write_data(tmp_path / "data.jsonl")
    train_args = ["train", "--model", str(folder), "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / out), *ARGS]
    if processes == 1:
        cmd = [sys.executable, "-m", "twotower.cli", *train_args]
    else:
        launch = [shutil.which("accelerate") or "accelerate", "launch", "--cpu", "--num_processes", str(processes)]
        cmd = [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "twotower.cli"]
        cmd += train_args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only the main process prints
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
def test_two_processes_match_one_process(tmp_path):
    one = _run(tmp_path, "one", 1)
    two = _run(tmp_path, "two", 2)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["masked_tokens"] == a["masked_tokens"]
    assert (tmp_path / "two" / "final" / "denoiser.safetensors").is_file()


def test_fsdp_on_a_cpu_is_refused_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    config = TrainConfig(data=str(_write_data(tmp_path / "d.jsonl")), out=str(tmp_path / "run"), fsdp=True)
    with pytest.raises(TwoTowerError, match="fsdp needs GPUs"):
        train(config, progress=False)
