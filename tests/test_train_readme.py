"""The README's "Train your own denoiser" commands, run as a user runs them from a clone, so that
the README cannot drift from what the commands do."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import tiny_backbone, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(section: str) -> list[str]:
    """The shell lines of the first fenced bash block under the README heading `section`
    (comments dropped, `NAME=value` lines kept as they are)."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(f"## {section}\n") :]
    block = re.search(r"```bash\n(.*?)```", body, re.S)[1]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_train_your_own_commands_run_as_written(tmp_path):
    """Substitutions, and only these, so that the commands fit a test: the model (`M=default`,
    the real backbone) becomes a tiny random one with 4 layers (the preset's denoiser depth) and
    room for distill's prompt and answer; distill makes 48 rows instead of 12000; the first run
    stops after 2 steps (its preset says 4000) and the longer one after 3 (8000). Everything else
    runs verbatim, each command in a process of its own (as a shell runs it), from a folder that
    holds the clone's configs/ and data/."""
    backbone = tmp_path / "backbone"
    tiny_backbone(num_hidden_layers=4, max_position_embeddings=512).save_pretrained(backbone)
    tiny_tokenizer().save_pretrained(backbone)
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TWOTOWER_CACHE": str(tmp_path / "cache")}  # this checkout's twotower

    names, runs = {}, []
    for line in readme_commands("Train your own denoiser"):
        if re.fullmatch(r"\w+=\S+", line):
            name, value = line.split("=")
            names[name] = str(backbone) if value == "default" else value
            continue
        words = [names.get(w[1:], w) if w.startswith("$") else w for w in shlex.split(line)]
        assert words[0] == "twotower", line
        words = [{"12000": "48", "8000": "3"}.get(w, w) for w in words[1:]]
        if words[0] == "train" and "--max-steps" not in words:
            words += ["--max-steps", "2"]
        done = subprocess.run(
            [sys.executable, "-m", "twotower.cli", *words], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert done.returncode == 0, (line, done.stderr[-2000:])
        runs.append((words[0], done))

    assert [command for command, _ in runs] == ["distill", "train", "train", "train", "draft-vocab", "generate"]
    assert len((tmp_path / "runs" / "distill" / "rows.jsonl").read_text().splitlines()) == 48
    first, again, longer = (json.loads(done.stdout.strip().splitlines()[-1]) for _, done in runs[1:4])
    assert first["step"] == again["step"] == 2 and "already finished at step 2" in runs[2][1].stderr
    assert longer["step"] == 3 and "training longer: --max-steps 2 -> 3 at step 2" in runs[3][1].stderr
    assert "held out (10%" in runs[1][1].stderr and list((tmp_path / "cache" / "features").iterdir())
    assert (tmp_path / "runs" / "mine" / "final" / "draft_vocab.safetensors").is_file()
    assert runs[5][1].stdout.strip()  # the reply
