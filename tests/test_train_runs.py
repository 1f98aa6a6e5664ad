"""A run folder never loses or corrupts work: a finished run rerun changes nothing, other
settings are refused before any work, Ctrl-C / SIGTERM save and resume exactly, a damaged latest
checkpoint is named and the one before it used, the data split is reported and a split too small
to train on is refused, the features cache is sized first."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone, tiny_tokenizer
from safetensors.torch import load_file
from test_train import _config, _model, _write_data

import twotower.train as trainer
from twotower import TwoTowerError
from twotower.data import pack, read_rows
from twotower.train import MAY_CHANGE_ON_RESUME, TrainConfig, TrainingStopped, train


def _cli_args(tmp_path, *extra):
    folder = tmp_path / "backbone"
    if not folder.exists():
        tiny_backbone().save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        _write_data(tmp_path / "data.jsonl")
    return [
        "train", "--data", str(tmp_path / "data.jsonl"), "--model", str(folder), "--out", str(tmp_path / "run"),
        "--block-size", "4", "--blocks-per-sequence", "3", "--batch-size", "2", "--max-steps", "3", "--save-every", "2",
        "--eval-sequences", "2", "--lora-rank", "2", "--lr", "0.003", "--warmup-steps", "1", *extra,
    ]  # fmt: skip


def _final_files(run):
    return {name: (run / "final" / name).read_bytes() for name in ("config.json", "denoiser.safetensors")}


def test_rerunning_a_finished_run_leaves_final_as_it_is(tmp_path, capsys):
    """The README's "the same command resumes", run once more after the end: final/ stays
    byte-identical with its trained-token count (it went to 0, and diffusion mode was then
    refused), nothing is trained again, one line says so; a final/ spoiled by the old bug is
    rewritten from the last checkpoint."""
    from twotower.cli import main

    run = tmp_path / "run"
    assert main(_cli_args(tmp_path)) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    before, log = _final_files(run), (run / "log.jsonl").read_text()
    assert json.loads(before["config.json"])["trained_tokens"] == first["training_tokens"] == 3 * 2 * 13
    assert main(_cli_args(tmp_path)) == 0
    captured = capsys.readouterr()
    assert f"{run} already finished at step 3" in captured.err and "add --extend to a larger --max-steps" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1]) == first
    assert _final_files(run) == before and (run / "log.jsonl").read_text() == log
    spoiled = json.loads(before["config.json"]) | {"trained_tokens": 0}
    (run / "final" / "config.json").write_text(json.dumps(spoiled))
    assert main(_cli_args(tmp_path)) == 0
    assert _final_files(run) == before and "written from step-3" in capsys.readouterr().err


def test_resume_refuses_other_settings_before_any_work(tmp_path):
    """--lr changed mid-run, --lora-rank changed (was a raw tensor-shape error), --max-steps
    raised after the decay (the learning rate jumped back to its peak) or lowered below the
    steps done: one line naming each setting, old -> new, and what to do; nothing is touched."""
    train(_config(tmp_path), _model(), tiny_tokenizer(), progress=False, stop_after=3)
    run = tmp_path / "run"
    log = (run / "log.jsonl").read_text()
    with pytest.raises(TwoTowerError, match=r"other settings: --lora-rank 4 -> 8, --lr 0.003 -> 0.0005; .*new --out$"):
        train(_config(tmp_path, lr=5e-4, lora_rank=8), _model(), tiny_tokenizer(), progress=False)
    each = r"--lora-rank 4 -> 8, --lr 0.003 -> 0.0005, --max-steps 6 -> 10; .*; to train it longer, add --extend"
    with pytest.raises(TwoTowerError, match=each):
        train(_config(tmp_path, lr=5e-4, lora_rank=8, max_steps=10), _model(), tiny_tokenizer(), progress=False)
    with pytest.raises(TwoTowerError, match="--max-steps 6 -> 1"):
        train(_config(tmp_path, max_steps=1), _model(), tiny_tokenizer(), progress=False)
    assert (run / "log.jsonl").read_text() == log and (run / "latest").read_text() == "step-2"
    train(_config(tmp_path), _model(), tiny_tokenizer(), progress=False)  # to the end
    with pytest.raises(TwoTowerError, match=r"--max-steps 6 -> 10; .*new --out; to train it longer, add --extend"):
        train(_config(tmp_path, max_steps=10), _model(), tiny_tokenizer(), progress=False)


def test_a_run_with_an_explicit_held_out_count_resumes_without_naming_it(tmp_path):
    """A run saved with --eval-sequences 2 (every run before the 10% default named a number)
    resumed without it keeps its 2 held-out sequences and ends as the uninterrupted run."""
    whole = train(_config(tmp_path / "a"), _model(), tiny_tokenizer(), progress=False)
    train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False, stop_after=3)
    resumed = train(_config(tmp_path / "b", eval_sequences=None), _model(), tiny_tokenizer(), progress=False)
    assert resumed["losses"] == whole["losses"] and resumed["step"] == whole["step"]


def test_resume_accepts_scheduling_settings_and_a_longer_stable_phase(tmp_path):
    """Log, eval and save intervals and the time limit may change; a larger max_steps only with
    --extend, and while the steps done keep their learning rates (before the decay) the result
    is the run that had the new settings from the start."""
    whole = train(_config(tmp_path / "a", max_steps=10), _model(), tiny_tokenizer(), progress=False)
    train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False, stop_after=3)  # saved at step 2 of 6
    changed = dict(max_steps=10, eval_every=5, save_every=3, max_minutes=60.0)
    with pytest.raises(TwoTowerError, match=r"--max-steps 6 -> 10; .*add --extend"):
        train(_config(tmp_path / "b", **changed), _model(), tiny_tokenizer(), progress=False)
    resumed = train(_config(tmp_path / "b", extend=True, **changed), _model(), tiny_tokenizer(), progress=False)
    assert resumed["losses"] == whole["losses"] and len(resumed["eval_losses"]) == 2
    assert resumed["extensions"] == [{"step": 2, "max_steps": 6, "to": 10, "lr": None}]
    assert {"eval_every", "save_every", "max_minutes", "out", "extend"} <= MAY_CHANGE_ON_RESUME
    assert not {"lr", "lora_rank", "seed", "data", "eval_sequences", "max_steps"} & MAY_CHANGE_ON_RESUME
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= MAY_CHANGE_ON_RESUME


def _final_weights(run):
    return load_file(str(run / "final" / "denoiser.safetensors"))


def _interrupt_at_call(monkeypatch, call: int, action):
    """Do `action` in the forward of the call-th loss of the run (a step is one call here)."""
    real, calls = trainer.masked_loss_sum, {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "masked_loss_sum", patched)


def _same_run(tmp_path, whole, resumed):
    assert resumed["losses"] == whole["losses"] and resumed["step"] == 6
    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_ctrl_c_saves_the_last_step_done_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt in step 4's forward: step 3 (not a checkpoint step) is saved, one
    line names it; the rerun says where it resumes and repeats the uninterrupted run bit for
    bit (losses and final weights)."""
    whole = train(_config(tmp_path / "a"), _model(), tiny_tokenizer(), progress=False)

    def ctrl_c():
        raise KeyboardInterrupt

    _interrupt_at_call(monkeypatch, 4, ctrl_c)
    with pytest.raises(TrainingStopped) as stopped:
        train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False)
    run = tmp_path / "b" / "run"
    assert str(stopped.value) == f"stopped at step 3 (saved {run / 'step-3'}); run the same command to resume"
    assert stopped.value.exit_code == 130 and (run / "latest").read_text() == "step-3"
    monkeypatch.undo()
    capsys.readouterr()
    resumed = train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False)
    assert f"resuming from step 3 of 6 ({run / 'step-3'})" in capsys.readouterr().err
    _same_run(tmp_path, whole, resumed)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_it_and_a_second_stops_at_once(tmp_path, monkeypatch, sig):
    """SIGINT / SIGTERM during step 4: step 4 finishes and is saved, then the run stops; the
    resumed run is the uninterrupted one. Two signals: it stops at once, the last step done
    (3) saved."""
    whole = train(_config(tmp_path / "a"), _model(), tiny_tokenizer(), progress=False)
    handler = signal.getsignal(sig)
    _interrupt_at_call(monkeypatch, 4, lambda: os.kill(os.getpid(), sig))
    with pytest.raises(TrainingStopped, match=r"stopped at step 4 \(saved .*step-4\)"):
        train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False)
    assert signal.getsignal(sig) is handler  # put back
    monkeypatch.undo()
    _same_run(tmp_path, whole, train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False))

    def twice():
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)

    _interrupt_at_call(monkeypatch, 4, twice)
    with pytest.raises(TrainingStopped, match=r"stopped at step 3 \(saved .*step-3\)"):
        train(_config(tmp_path / "c"), _model(), tiny_tokenizer(), progress=False)


def test_ctrl_c_on_the_command_line_is_one_line_without_a_traceback(tmp_path, monkeypatch, capsys):
    from twotower.cli import main

    def ctrl_c():
        raise KeyboardInterrupt

    _interrupt_at_call(monkeypatch, 2, ctrl_c)
    code = main(_cli_args(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "Traceback" not in "\n".join(err)
    assert err[-1].endswith(f"stopped at step 1 (saved {tmp_path / 'run' / 'step-1'}); run the same command to resume")


def test_sigint_to_the_command_saves_its_step_without_a_traceback_and_resumes_exactly(tmp_path):
    """`twotower train` in a subprocess, SIGINT once a few steps are logged: one line naming the
    step saved, no traceback; the same command then ends where an uninterrupted run ends."""
    from twotower.cli import main

    args = _cli_args(tmp_path, "--max-steps", "40", "--save-every", "1000")
    run, log = tmp_path / "run", tmp_path / "run" / "log.jsonl"
    command = [sys.executable, "-m", "twotower.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}  # this checkout's twotower
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    step = int(re.fullmatch(r".*stopped at step (\d+) \(saved .*\); run the same command to resume", err.splitlines()[-1])[1])
    assert 3 <= step < 40 and (run / "latest").read_text() == f"step-{step}"
    assert main(args) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    losses = [
        [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
        for folder in (run, tmp_path / "whole")
    ]
    assert len(losses[0]) == 40 and losses[0] == losses[1]


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {  # a way to spoil a checkpoint folder: (do it, what the line says is wrong)
    "truncated weights": (lambda f: _truncate(f / "denoiser.safetensors"), "denoiser.safetensors is truncated or corrupt"),
    "truncated optimizer": (lambda f: _truncate(f / "optimizer.safetensors"), "optimizer.safetensors is truncated or corrupt"),
    "bad json": (lambda f: (f / "state.json").write_text('{"step": 4, "los'), "state.json is truncated or corrupt"),
    "missing file": (lambda f: (f / "config.json").unlink(), "config.json missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_it_used(tmp_path, capsys, damage):
    """Two checkpoints are kept (steps 2 and 4 of a run killed after step 5); the latest one
    truncated or spoiled: the rerun names it and what is wrong in one line, goes on from step 2
    and ends as the uninterrupted run, bit for bit, keeping the last two checkpoints again."""
    whole = train(_config(tmp_path / "a"), _model(), tiny_tokenizer(), progress=False)
    train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False, stop_after=5)
    run = tmp_path / "b" / "run"
    assert (run / "latest").read_text() == "step-4" and sorted(p.name for p in run.glob("step-*")) == ["step-2", "step-4"]
    spoil, wrong = DAMAGE[damage]
    spoil(run / "step-4")
    capsys.readouterr()
    resumed = train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False)
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'step-4'} cannot be used: {wrong}" in err and "Traceback" not in err
    assert f"resuming from step 2 of 6 ({run / 'step-2'})" in err
    _same_run(tmp_path, whole, resumed)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-4", "step-6"]


def test_no_usable_checkpoint_is_one_error_naming_each(tmp_path):
    """Both checkpoints spoiled (and a `latest` naming a folder that is gone): one
    TwoTowerError naming each and what to do, before any work."""
    train(_config(tmp_path), _model(), tiny_tokenizer(), progress=False, stop_after=5)
    run = tmp_path / "run"
    _truncate(run / "step-4" / "optimizer.safetensors")
    (run / "step-2" / "state.json").unlink()
    both = r"\(.*step-4 cannot be used: .*; .*step-2 cannot be used: state.json missing\): to start the run over, remove"
    with pytest.raises(TwoTowerError, match=r"no checkpoint in .* can be used " + both):
        train(_config(tmp_path), _model(), tiny_tokenizer(), progress=False)
    (run / "latest").write_text("step-8")
    with pytest.raises(TwoTowerError, match=r"step-8 cannot be used: the folder is missing; "):
        train(_config(tmp_path), _model(), tiny_tokenizer(), progress=False)


# --- the data split -------------------------------------------------------------------------


def test_the_split_is_reported_and_too_little_to_train_on_is_refused(tmp_path, capsys):
    """Each row is 17 tokens, sequences 13: 8 rows pack into 10 sequences. Holding out 6
    leaves 4: refused, naming --eval-sequences, the rows needed and the most that fits; the
    rows named are enough. Training reports its split, with a warning above 10% held out."""
    tok = tiny_tokenizer()
    packed = pack(read_rows(_write_data(tmp_path / "d.jsonl", rows=8)), tok, seq_len=13)
    assert packed.describe_split(2).startswith(
        "8 rows -> 10 packed sequences of 13 tokens: 8 train, 2 held out; warning: --eval-sequences 2 holds out 20%"
    )
    assert "warning" not in pack(read_rows(_write_data(tmp_path / "e.jsonl", rows=60)), tok, 13).describe_split(2)
    message = (
        "--eval-sequences 6 leaves 4 to train on, fewer than the held-out ones; "
        "give about 10 rows or more, or --eval-sequences 5 or fewer"
    )
    with pytest.raises(TwoTowerError, match=message):
        packed.split(6)
    assert [len(part) for part in packed.split(5)] == [5, 5]
    enough = pack(read_rows(_write_data(tmp_path / "f.jsonl", rows=10)), tok, seq_len=13)
    assert [len(part) for part in enough.split(6)] == [7, 6]
    with pytest.raises(TwoTowerError, match=r"fewer than one batch \(--batch-size 9\); give about 9 rows"):
        packed.split(2, batch_size=9)
    with pytest.raises(TwoTowerError, match="0 rows pack into 0 sequences"):
        pack([], tok, seq_len=13).split(1)

    config = _config(tmp_path / "run", eval_sequences=6)
    config.data, config.max_rows = str(tmp_path / "d.jsonl"), None
    with pytest.raises(TwoTowerError, match="--eval-sequences 6 leaves 4"):
        train(config, _model(), tok, progress=False)
    assert not (tmp_path / "run" / "run" / "log.jsonl").exists()
    capsys.readouterr()
    train(_config(tmp_path / "ok", max_steps=1), _model(), tok, progress=False)
    assert "60 rows -> 78 packed sequences of 13 tokens: 76 train, 2 held out" in capsys.readouterr().err


# --- the features cache ------------------------------------------------------------------------


def test_features_are_sized_first_and_a_full_disk_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    import twotower.features as features

    model, ids = _model(), torch.randint(3, 90, (5, 13))
    features.build_features(model, ids, tmp_path / "a", 4, top_k=4, progress=False)
    size = sum(f.stat().st_size for f in (tmp_path / "a").glob("shard-*"))
    line = capsys.readouterr().err
    assert line.startswith("features: 5 sequences x ") and f"in {tmp_path / 'a'}" in line
    number, unit = line.split("= about ")[1].split()[:2]
    estimate = float(number) * {"KB": 1e3, "MB": 1e6}[unit]
    assert abs(estimate - size) < 0.05 * size  # the shards hold the tensors and a small header

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(TwoTowerError, match=r"need about .* more in .*, which has 1.0 KB free: .*--features"):
        features.build_features(model, ids, tmp_path / "b", 4, top_k=4, progress=False)
    assert not list((tmp_path / "b").iterdir())
    monkeypatch.setattr(features.shutil, "disk_usage", shutil.disk_usage)
    with pytest.raises(TwoTowerError, match=r"--features .* other data or settings .*; give another --features folder"):
        features.build_features(model, ids[:4], tmp_path / "a", 4, top_k=4, progress=False)


# --- training longer: --extend -----------------------------------------------------------------


def _log(run: Path, key: str) -> list:
    return [json.loads(line)[key] for line in (run / "log.jsonl").read_text().splitlines()]


def test_extend_goes_on_from_the_learning_rate_reached_and_resumes_exactly(tmp_path, capsys):
    """A run stopped in its decay (4 of 6 steps, the decay over steps 4-6) made longer with
    --extend: one line says so, the learning rate goes on from step 4's (held, then decayed to
    min_lr over the last half of the steps added, never back to the peak) and the change is in
    the run state. Killed once before and once after its first checkpoint and rerun with the
    same command, the extended run equals the uninterrupted one bit for bit."""
    schedule = dict(decay_fraction=0.5, min_lr=1e-4)
    longer = dict(schedule, max_steps=10, extend=True)
    for name in ("a", "b"):
        train(_config(tmp_path / name, **schedule), _model(), tiny_tokenizer(), progress=False, stop_after=4)
    capsys.readouterr()
    whole = train(_config(tmp_path / "a", **longer), _model(), tiny_tokenizer(), progress=False)
    lrs, peak = _log(tmp_path / "a" / "run", "lr"), _config(tmp_path).lr
    assert max(lrs[:3]) == peak > lrs[3]  # step 4 was in the decay
    assert lrs[4:7] == [lrs[3]] * 3 and lrs[6] > lrs[7] > lrs[8] > lrs[9] == pytest.approx(schedule["min_lr"])
    expected = f"training longer: --max-steps 6 -> 10 at step 4: the learning rate goes on from {lrs[3]:.3g} (not back to"
    assert expected in capsys.readouterr().err
    assert whole["extensions"] == [{"step": 4, "max_steps": 6, "to": 10, "lr": lrs[3]}]

    run = tmp_path / "b" / "run"
    train(_config(tmp_path / "b", **longer), _model(), tiny_tokenizer(), progress=False, stop_after=1)  # killed: step 5
    train(_config(tmp_path / "b", **longer), _model(), tiny_tokenizer(), progress=False, stop_after=3)  # saved at 6
    assert json.loads((run / "step-6" / "state.json").read_text())["extensions"] == whole["extensions"]
    capsys.readouterr()
    resumed = train(_config(tmp_path / "b", **longer), _model(), tiny_tokenizer(), progress=False)
    err = capsys.readouterr().err
    assert f"resuming from step 6 of 10 ({run / 'step-6'})" in err and "training longer" not in err
    assert resumed["losses"] == whole["losses"] and _log(run, "lr") == lrs
    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run_goes_on_at_its_final_learning_rate(tmp_path, capsys):
    """A finished run (its last step at min_lr) extended: the steps added stay at min_lr, no
    warmup to the peak again; the same command rerun after that says the run is finished."""
    train(_config(tmp_path), _model(), tiny_tokenizer(), progress=False)
    longer = _config(tmp_path, max_steps=9, extend=True)
    state = train(longer, _model(), tiny_tokenizer(), progress=False)
    lrs = _log(tmp_path / "run", "lr")
    assert state["step"] == 9 and lrs[6:] == [lrs[5]] * 3 and lrs[5] == pytest.approx(longer.min_lr)
    assert "training longer: --max-steps 6 -> 9 at step 6: the learning rate stays at its final" in capsys.readouterr().err
    assert train(longer, _model(), tiny_tokenizer(), progress=False)["losses"] == state["losses"]
    assert f"{tmp_path / 'run'} already finished at step 9" in capsys.readouterr().err


# --- the held-out share ------------------------------------------------------------------------


def test_held_out_sequences_are_a_tenth_at_most_the_cap_unless_chosen(tmp_path, capsys):
    """Without --eval-sequences 10% of the packed sequences are held out (at least one, at most
    --max-eval-sequences), and the start line says so; --eval-sequences N holds out exactly N.
    Too little data for a batch: one line naming --eval-sequences and the rows that are enough."""
    tok = tiny_tokenizer()
    n = len(pack(read_rows(_write_data(tmp_path / "data.jsonl")), tok, seq_len=13).sequences)
    config = _config(tmp_path, eval_sequences=None, max_eval_sequences=64, max_steps=1)
    capsys.readouterr()
    train(config, _model(), tok, progress=False)
    held = n // 10
    line = f"60 rows -> {n} packed sequences of 13 tokens: {n - held} train, {held} held out (10%, at most --max-eval"
    assert line in capsys.readouterr().err
    capped = _config(tmp_path / "capped", eval_sequences=None, max_eval_sequences=3, max_steps=1)
    train(capped, _model(), tok, progress=False)
    assert f"{n - 3} train, 3 held out (10%" in capsys.readouterr().err
    chosen = _config(tmp_path / "chosen", eval_sequences=20, max_eval_sequences=3, max_steps=1)
    train(chosen, _model(), tok, progress=False)
    assert f"{n - 20} train, 20 held out; warning: --eval-sequences 20 holds out" in capsys.readouterr().err

    small = _config(tmp_path / "small", eval_sequences=None, batch_size=16)
    small.data = str(_write_data(tmp_path / "small" / "few.jsonl", rows=8))
    with pytest.raises(TwoTowerError, match=r"--eval-sequences 1 leaves 9 to train on, .*give about (\d+) rows") as err:
        train(small, _model(), tok, progress=False)
    rows = int(re.search(r"give about (\d+) rows", str(err.value))[1])
    enough = pack(read_rows(_write_data(tmp_path / "enough.jsonl", rows=rows)), tok, seq_len=13)
    assert len(enough.split(enough.held_out(None, 64), batch_size=16)[0]) >= 16


# --- the features folder -----------------------------------------------------------------------


def test_features_auto_is_one_folder_per_data_and_settings(tmp_path, monkeypatch):
    """--features auto: other data, or other settings that shape the features, get a folder of
    their own under $TWOTOWER_CACHE/features (listed by `twotower cache list`); the same data and
    settings find theirs again and build nothing."""
    from twotower import cache

    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    features = tmp_path / "cache" / "features"

    def run(name, data_seed=0, backbone_seed=0, **overrides):
        config = _config(tmp_path / name, features="auto", max_steps=2, **overrides)
        config.data = str(_write_data(tmp_path / name / "data.jsonl", seed=data_seed))
        train(config, _model(seed=backbone_seed), tiny_tokenizer(), progress=False)
        return {f: f.stat().st_mtime_ns for f in features.glob("*/shard-*")}

    folders = lambda: [f for f in features.iterdir() if f.is_dir()]  # beside each, its build's lock file

    first = run("a")
    assert len(first) == 1 and [f.name.startswith("data-") for f in folders()] == [True]
    assert len(run("b", data_seed=1)) == 2 and len(folders()) == 2  # other data
    run("c", top_k=8)  # other settings
    run("d", backbone_seed=1)  # another backbone
    assert len(folders()) == 4
    again = run("e")  # the data and settings of "a": found, not rebuilt
    assert len(folders()) == 4 and all(again[k] == v for k, v in first.items())
    listed = cache.describe()
    assert all(f"features/{f.name}" in listed for f in folders()) and ".lock" not in listed


# --- the command line --------------------------------------------------------------------------


def test_none_on_the_command_line_undoes_a_preset_value_and_help_says_how(tmp_path, capsys):
    from twotower.cli import main

    preset = tmp_path / "preset.yaml"
    preset.write_text("denoiser_depth: 1\n")
    args = [*_cli_args(tmp_path, "--max-steps", "1"), "--config", str(preset)]
    assert main(args) == 0
    assert main([*args, "--denoiser-depth", "None", "--out", str(tmp_path / "all")]) == 0
    depth = [json.loads((tmp_path / run / "final" / "config.json").read_text())["denoiser_depth"] for run in ("run", "all")]
    assert depth == [1, None]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "its values override the defaults shown below" in shown and "`--denoiser-depth None` undoes a preset's K" in shown


def test_training_on_from_a_checkpoint_whose_backbone_moved(tmp_path, capsys):
    """`train --model CKPT --backbone PATH`: the backbone where it lies now trains on; another
    backbone is refused in one line naming both, before any work."""
    from twotower import load_model
    from twotower.cli import main

    args = _cli_args(tmp_path, "--max-steps", "1")  # writes the backbone folder and the data
    model, _ = load_model(str(tmp_path / "backbone"), dtype=torch.float32, block_size=4)
    model.save_pretrained(tmp_path / "checkpoint")
    moved = (tmp_path / "backbone").rename(tmp_path / "moved")
    other = tmp_path / "other"
    tiny_backbone(seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    args[args.index("--model") + 1] = str(tmp_path / "checkpoint")
    capsys.readouterr()
    assert main([*args, "--backbone", str(other)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "backbone") in err and str(other) in err
    assert not (tmp_path / "run").exists()
    assert main([*args, "--backbone", str(moved)]) == 0
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["backbone_ref"] == str(moved)


def test_a_base_model_without_a_chat_template_trains_on_plain_text(tmp_path, capsys):
    """What the README says of a base model: distill refuses it in one line naming the chat
    template; train takes a .txt file (one row per line) instead."""
    from twotower.cli import main

    base = tmp_path / "base"
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(base)
    tiny_backbone().save_pretrained(base)
    capsys.readouterr()
    assert main(["distill", "--model", str(base), "--out", str(tmp_path / "d.jsonl"), "--rows", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an instruct model with a chat template" in err[0]
    text = tmp_path / "notes.txt"
    text.write_text("".join(" ".join(f"w{3 + (i + k) % 90}" for k in range(12)) + "\n" for i in range(40)))
    args = _cli_args(tmp_path, "--max-steps", "1")
    args[args.index("--data") + 1], args[args.index("--model") + 1] = str(text), str(base)
    assert main(args) == 0
    assert "40 rows -> " in capsys.readouterr().err and (tmp_path / "run" / "final" / "denoiser.safetensors").is_file()
