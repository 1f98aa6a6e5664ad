"""The command line on a tiny backbone folder with a tiny word-level tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone, tiny_tokenizer

from twotower.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-backbone")
    tiny_tokenizer().save_pretrained(folder)
    tiny_backbone().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory, tiny_folder):
    """A twotower checkpoint over the tiny backbone folder whose denoiser counts as trained."""
    from conftest import perturb_trained

    from twotower import load_model

    model, _ = load_model(str(tiny_folder), dtype=torch.float32, block_size=8)
    perturb_trained(model, scale=0.01)
    model.config.trained_tokens = 1
    folder = tmp_path_factory.mktemp("tiny-trained")
    model.save_pretrained(folder)
    return folder


def run_json(capsys, *args):
    assert main(["generate", "--json", "--dtype", "fp32", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["ar", "mock-ar", "diffusion"])
def test_generate_json(capsys, trained_folder, mode):
    out = run_json(capsys, "--model", str(trained_folder), "--mode", mode, "--max-new-tokens", "12", "w5 w6 w7")
    assert set(out) == {"text", "new_tokens", "nfe", "tokens_per_nfe", "seconds", "mode"}
    assert out["mode"] == mode and 1 <= out["new_tokens"] <= 12 and out["nfe"] >= 1
    assert out["text"].strip()


def test_mock_ar_text_equals_ar_text_and_no_chat_differs(capsys, tiny_folder):
    args = ["--model", str(tiny_folder), "--max-new-tokens", "10", "w9 w10"]
    ar = run_json(capsys, *args)
    assert run_json(capsys, "--mode", "mock-ar", *args)["text"] == ar["text"]
    assert run_json(capsys, "--no-chat", *args)["text"] != ar["text"]


def test_diffusion_mode_refuses_an_untrained_denoiser_in_one_line(capsys, tiny_folder):
    assert main(["generate", "--model", str(tiny_folder), "--mode", "diffusion", "w5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trained denoiser" in err and "--mode verify" in err


def test_stream_prints_the_same_text(capsys, trained_folder):
    args = ["--model", str(trained_folder), "--mode", "diffusion", "--max-new-tokens", "12", "--dtype", "fp32", "w5"]
    assert main(["generate", *args]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "--stream", *args]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threshold", "1.5"], "must be in (0, 1]"),
        (["--threshold", "0"], "must be in (0, 1]"),
        (["--block-size", "0"], "must be >= 1"),
        (["--max-new-tokens", "x"], "expected an integer"),
        (["--mode", "fast"], "invalid choice"),
    ],
)
def test_invalid_options_exit_2_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv, "hello"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_library_errors_are_reported_without_traceback(capsys, tiny_folder, trained_folder):
    code = main(["generate", "--model", str(trained_folder), "--mode", "diffusion", "--block-size", "32", "w5"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("twotower: error:") and "Traceback" not in err
    assert main(["generate", "--model", str(tiny_folder / "nope"), "w5"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("draft", ["auto", "denoiser", "lookup", "ar"])
def test_verify_mode_prints_ar_text_and_draft_statistics(capsys, tiny_folder, draft):
    args = ["--model", str(tiny_folder), "--max-new-tokens", "16", "w9 w10 w9 w10"]
    ar = run_json(capsys, *args)
    out = run_json(capsys, "--mode", "verify", "--draft", draft, *args)
    assert out["text"] == ar["text"] and out["new_tokens"] == ar["new_tokens"]
    assert out["cycles"] >= 1 and sum(out["draft_sources"].values()) == out["cycles"]
    assert out["context_passes"] == out["cycles"] + 1  # the prefill, then one pass per cycle
    if draft == "denoiser":
        assert out["denoiser_passes"] > 0
    elif draft in ("lookup", "ar"):
        assert out["denoiser_passes"] == 0


def test_distill_cli_writes_rows(tmp_path, capsys, tiny_folder):
    out = tmp_path / "d.jsonl"
    argv = [
        "distill",
        "--model",
        str(tiny_folder),
        "--out",
        str(out),
        "--rows",
        "3",
        "--batch-size",
        "2",
        "--max-prompt-tokens",
        "4",
        "--max-answer-tokens",
        "4",
        "--dtype",
        "fp32",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 3 and len(out.read_text().splitlines()) == 3


def test_help_describes_every_option(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"generate", "eval", "bench", "train", "distill", "convert", "draft-vocab", "serve", "cache"}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, (name, action.dest)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "generate" in capsys.readouterr().out


@pytest.fixture()
def prompts_file(tmp_path):
    rows = [
        {"id": "a", "category": "qa", "prompt": "w5 w6", "check": "none", "max_new_tokens": 6},
        {"id": "b", "category": "qa", "prompt": "w9 w10 w9", "check": "contains", "answer": "w9", "max_new_tokens": 6},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_command_runs_end_to_end_and_writes_json(tmp_path, capsys, trained_folder, prompts_file):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(trained_folder), "--prompts", str(prompts_file), "--modes", "mock-ar"]
    assert main([*argv, "--no-judge", "--dtype", "fp32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "mock-ar" in json.dumps(report) and capsys.readouterr().out.strip()


def test_eval_suite_option_is_checked(capsys):
    args = build_parser().parse_args(["eval", "--suite", "builtin,humaneval"])
    assert args.suite == ["builtin", "humaneval"]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--suite", "mmlu"])
    assert exit_info.value.code == 2 and "unknown suite" in capsys.readouterr().err


def test_bench_command_runs_end_to_end_and_writes_json(tmp_path, capsys, trained_folder, prompts_file):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(trained_folder), "--prompts", str(prompts_file), "--modes", "mock-ar"]
    argv += ["--batch-sizes", "1", "--max-new-tokens", "6", "--no-hf", "--no-llama-cpp", "--dtype", "fp32"]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text()) and capsys.readouterr().out.strip()
    # per category, each prompt twice: a row per category and point, over twice the prompts
    assert main([*argv, "--by-category", "--num-prompts", "1", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["prompts"] == 2 and report["repeats"] == 2
    assert [(r["category"], r["point"]) for r in report["category_rows"]] == [("qa", "ar"), ("qa", "mock-ar")]
    assert "category" in capsys.readouterr().out


def test_weights_option_quantises_generate_and_eval_compares_with_the_dense_ar(
    tmp_path, capsys, monkeypatch, trained_folder, prompts_file
):
    out = run_json(capsys, "--model", str(trained_folder), "--weights", "int8", "--max-new-tokens", "8", "w5 w6 w7")
    assert 1 <= out["new_tokens"] <= 8 and out["text"].strip()
    with pytest.raises(SystemExit):
        main(["generate", "--weights", "int3", "w5"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    report_file = tmp_path / "eval.json"
    argv = ["eval", "--model", str(trained_folder), "--prompts", str(prompts_file), "--modes", "mock-ar", "--weights", "int8"]
    monkeypatch.setattr("twotower.quant.QUANTISED_ROWS", 4)  # so that the batch of 8 is wider
    assert main([*argv, "--no-judge", "--dtype", "fp32", "--out", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert [p["point"] for p in report["points"]] == ["ar dense", "ar", "mock-ar"]
    assert report["points"][0]["exact_match"] == 1.0 and report["environment"]["weights"] == "int8"
    assert any("--batch-size 1 measures the int8 weights alone" in n for n in report["notes"])  # batch 8: a mix
    capsys.readouterr()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "config.json").write_text('{"model_type": "llama", "hidden'), "config.json is not valid JSON"),
        (lambda f: [p.unlink() for p in f.glob("*.safetensors")], "has a config.json but no weights"),
    ],
    ids=["truncated-config", "no-weights"],
)
def test_a_broken_model_folder_is_one_line_that_names_the_file(capsys, tmp_path, damage, message):
    """A backbone folder with a truncated config or no weights."""
    folder = tmp_path / "backbone"
    tiny_tokenizer().save_pretrained(folder)
    tiny_backbone().save_pretrained(folder)
    damage(folder)
    capsys.readouterr()  # what saving the folder printed
    assert main(["generate", "--model", str(folder), "--dtype", "fp32", "w5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(folder) in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block-size", "4"], "--block-size applies to diffusion and verify mode, not ar"),
        (["--threshold", "0.5", "--mode", "mock-ar"], "--threshold applies to diffusion and verify mode, not mock-ar"),
        (["--draft", "lookup", "--mode", "diffusion"], "--draft applies to verify mode, not diffusion"),
        (["--steps-per-block", "4", "--mode", "verify"], "--steps-per-block applies to diffusion mode, not verify"),
    ],
)
def test_a_flag_that_does_not_apply_to_the_mode_is_refused(capsys, tiny_folder, argv, message):
    assert main(["generate", "--model", str(tiny_folder), *argv, "w5"]) == 2
    assert message in capsys.readouterr().err


def test_stream_with_json_prints_json_lines_then_the_result(capsys, trained_folder):
    args = ["--model", str(trained_folder), "--mode", "diffusion", "--max-new-tokens", "12", "--dtype", "fp32", "w5"]
    final = run_json(capsys, *args)
    assert main(["generate", "--stream", "--json", *args]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    deltas, result = lines[:-1], lines[-1]
    assert deltas and all(set(d) == {"delta"} for d in deltas)
    assert "".join(d["delta"] for d in deltas) == result["text"] == final["text"]


def test_help_imports_no_torch():
    code = "import sys; from twotower.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_checkpoint_with_a_truncated_config_is_one_line(capsys, tmp_path, trained_folder):
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(trained_folder, folder)
    (folder / "config.json").write_text((folder / "config.json").read_text()[:100])
    capsys.readouterr()  # what building the fixtures printed
    assert main(["generate", "--model", str(folder), "--dtype", "fp32", "w5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json is not valid JSON" in err and str(folder) in err


def test_train_help_shows_the_preset_values_with_config(capsys):
    preset = Path(__file__).resolve().parent.parent / "configs" / "smollm2-shallow.yaml"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    plain = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--config", str(preset), "--help"])
    shown = capsys.readouterr().out
    assert "block size S trained (default: 16)" in plain  # the built-in default
    assert "block size S trained (default: 8)" in shown and "(default: 0.001)" in shown  # the preset's
