"""`twotower cache`: list shows each entry of $TWOTOWER_CACHE with its size and the total;
clear removes the named entries or all of them, asking nothing; an unknown name is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from twotower.cli import main

BACKBONE = "backbones/SmolLM2-135M-Instruct.Q4_1-bfloat16-0123456789ab"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder with a converted backbone (two files) and its conversion's lock file, one
    an interrupted conversion left, and a judge folder at the top."""
    root = tmp_path / "cache"
    for name, size in [
        (f"{BACKBONE}/model.safetensors", 2_500_000),
        (f"{BACKBONE}/config.json", 500),
        ("backbones/.converting-x1y2/model.safetensors", 1000),
        (f"backbones/.{BACKBONE.split('/')[1]}.lock", 0),  # the conversion's lock: not an entry
        ("judge/model.safetensors", 40_000),
    ]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\0" * size)
    monkeypatch.setenv("TWOTOWER_CACHE", str(root))
    return root


def test_list_shows_each_entry_with_its_size_and_the_total(cache, capsys):
    assert main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["backbones/.converting-x1y2", BACKBONE, "judge"]
    assert lines[0].endswith("1.0 KB") and lines[1].endswith("2.5 MB") and lines[2].endswith("40.0 KB")
    assert lines[-1] == f"3 entries, 2.5 MB in {cache}"


def test_clear_a_name_removes_only_that_one_and_clear_removes_all(cache, capsys):
    assert main(["cache", "clear", "judge"]) == 0
    assert capsys.readouterr().out.splitlines() == ["removed judge (40.0 KB)", f"freed 40.0 KB in {cache}"]
    assert not (cache / "judge").exists() and (cache / BACKBONE / "model.safetensors").is_file()
    assert main(["cache", "clear"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["removed backbones/.converting-x1y2 (1.0 KB)", f"removed {BACKBONE} (2.5 MB)"]
    assert list((cache / "backbones").iterdir()) == []
    assert main(["cache", "list"]) == 0 and capsys.readouterr().out.strip() == f"nothing cached in {cache}"


def test_an_unknown_name_is_one_line_and_removes_nothing(cache, capsys):
    assert main(["cache", "clear", "judge", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("twotower: error: no cache entry named nope in ")
    assert "`twotower cache list` shows them" in err and (cache / "judge").is_dir()


def test_a_missing_cache_folder_is_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "none"))
    assert main(["cache", "list"]) == 0 and "nothing cached in" in capsys.readouterr().out


def test_the_cache_module_imports_no_torch():
    code = "import sys, twotower.cache, twotower.cli; print('torch' in sys.modules)"
    root = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert result.stdout.strip() == "False"
