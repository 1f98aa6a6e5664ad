"""Checkpoints travel: a checkpoint whose backbone folder moved runs with `--backbone PATH`
(generate and train), gives the tokens it gave before the move, and is refused with another
backbone (one line naming both) or without `--backbone` (a line naming it)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb_trained, tiny_backbone, tiny_tokenizer
from test_train import _write_data

from twotower import load_model
from twotower.backbones import backbone_fingerprint
from twotower.cli import main


def _save_backbone(folder, seed=0):
    tiny_tokenizer().save_pretrained(folder)
    tiny_backbone(seed=seed).save_pretrained(folder)
    return folder.resolve()


@pytest.fixture()
def moved(tmp_path):
    """(checkpoint, where its backbone was, where it is now, the generation before the move)."""
    backbone = _save_backbone(tmp_path / "backbone")
    model, _ = load_model(str(backbone), dtype=torch.float32, block_size=8)
    perturb_trained(model, scale=0.01)
    model.config.trained_tokens = 1
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    before = _generate(checkpoint)
    return checkpoint, backbone, backbone.rename(tmp_path / "moved"), before


def _generate(checkpoint, *extra):
    argv = ["generate", "--json", "--dtype", "fp32", "--model", str(checkpoint), "--mode", "diffusion"]
    return main([*argv, "--max-new-tokens", "12", *extra, "w5 w6 w7"])


def _out(capsys):
    out = json.loads(capsys.readouterr().out)
    return {k: out[k] for k in ("text", "new_tokens", "nfe")}


def test_a_moved_backbone_is_named_with_backbone_and_gives_the_same_tokens(capsys, moved):
    checkpoint, backbone, new_place, code = moved
    assert code == 0
    before = _out(capsys)
    assert _generate(checkpoint) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} was trained on backbone {str(backbone)!r}, which is not found" in err
    assert "--backbone PATH" in err and len(err.strip().splitlines()) == 1
    assert _generate(checkpoint, "--backbone", str(new_place)) == 0
    assert _out(capsys) == before and before["new_tokens"] >= 1


def test_another_backbone_is_refused_naming_both(capsys, tmp_path, moved):
    checkpoint, backbone, _, _ = moved
    capsys.readouterr()
    other = _save_backbone(tmp_path / "other", seed=1)
    stored = json.loads((checkpoint / "config.json").read_text())["backbone_fingerprint"]
    assert _generate(checkpoint, "--backbone", str(other)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for part in (str(checkpoint), repr(str(backbone)), stored, repr(str(other)), "--backbone PATH"):
        assert part in err, part
    assert backbone_fingerprint(tiny_backbone(seed=1)) in err


def test_backbone_for_something_that_is_not_a_checkpoint_is_refused(capsys, moved):
    _, _, new_place, _ = moved
    capsys.readouterr()
    assert main(["generate", "--model", str(new_place), "--backbone", str(new_place), "w5"]) == 2
    err = capsys.readouterr().err
    assert "is not one" in err and "pass it as --model alone" in err
    assert main(["generate", "--model", str(new_place / "nope"), "--backbone", str(new_place), "w5"]) == 2
    assert "not found" in capsys.readouterr().err


def test_training_goes_on_from_a_moved_checkpoint_with_backbone(capsys, tmp_path, moved):
    """`train --model CKPT --backbone PATH`: the new run's checkpoints record where the backbone
    lies now; --backbone with a backbone as --model is refused."""
    checkpoint, _, new_place, _ = moved
    data = _write_data(tmp_path / "data.jsonl")
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--block-size", "8",
            "--blocks-per-sequence", "2", "--batch-size", "2", "--max-steps", "1", "--eval-sequences", "2"]  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--model", str(checkpoint)]) == 2
    assert "--backbone PATH" in capsys.readouterr().err
    assert main([*argv, "--model", str(new_place), "--backbone", str(new_place)]) == 2
    assert "pass it as --model alone" in capsys.readouterr().err
    assert main([*argv, "--model", str(checkpoint), "--backbone", str(new_place)]) == 0
    final = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert (
        final["backbone_ref"] == str(new_place)
        and final["backbone_fingerprint"] == json.loads((checkpoint / "config.json").read_text())["backbone_fingerprint"]
    )
