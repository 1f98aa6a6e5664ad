"""Measurement: scorers on hand-made replies, the python sandbox, the arithmetic of retention
and agreement, prompt files, and the eval / bench harness on tiny models."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from conftest import PROMPTS, tiny_backbone, tiny_tokenizer, tiny_two_tower

from twotower import TwoTowerError
from twotower.cli import main
from twotower.eval import checks, metrics
from twotower.eval.checks import run_python, score
from twotower.eval.harness import AR, OperatingPoint, operating_points, plot_curve, run_eval
from twotower.eval.judge import Judge
from twotower.eval.tasks import Task, builtin_tasks, load_prompts


def task(check, answer=None, category="c"):
    return Task("t1", category, "prompt", check, answer)


@pytest.mark.parametrize(
    "check, answer, good, bad",
    [
        ("contains", "Paris", "The capital of France is  paris.", "It is London."),
        ("contains", ["mice", "mouses"], "The plural is mice.", "The plural is mouse."),
        ("exact", "The cat sat on the mat.", "  The cat sat on the mat.\n", "The cat sat on the mat!"),
        ("regex", r"(?<![\d.])19(?!\d|\.\d)", "12 + 7 = 19.", "12 + 7 = 190"),
        ("regex", r"(?<![\d.])19(?!\d|\.\d)", "The answer is 19", "It is 19.5"),
        ("regex", r"(?i)\bthursday\b", "Thursday", "Thursdays"),
        ("count>=3", None, "- red\n- green\n- blue", "- red\n- green\nand blue"),
        ("count>=3", None, "1. red\n2) green\n3. blue", "1, 2, 3"),
        ("count>=3", r"(?i)hello", "Hello hello HELLO", "hello hello"),
        (
            "python",
            "assert add(2, 3) == 5",
            "```python\ndef add(a, b):\n    return a + b\n```\nDone.",
            "```python\ndef add(a, b):\n    return a - b\n```",
        ),
        ("python", "assert double(4) == 8", "def double(x):\n    return 2 * x", "def double(x) return 2x"),
    ],
)
def test_each_check_passes_and_fails_where_it_should(check, answer, good, bad):
    assert score(task(check, answer), good) is True
    assert score(task(check, answer), bad) is False


def test_unscored_check_and_unknown_check():
    assert score(task("none"), "anything") is None
    with pytest.raises(TwoTowerError, match="unknown check"):
        task("fuzzy", "x").validate()
    with pytest.raises(TwoTowerError, match="needs an answer"):
        task("regex").validate()


def test_python_check_stops_at_its_time_limit():
    begin = time.perf_counter()
    result = run_python("while True:\n    pass", timeout=1.0)
    assert result == checks.PythonResult(False, "timeout")
    assert time.perf_counter() - begin < 5


@pytest.mark.parametrize("namespace", [True, False], ids=["netns+guard", "guard-only"])
def test_python_check_cannot_reach_the_network(monkeypatch, namespace):
    if not namespace:
        monkeypatch.setattr(checks, "_network_namespace_prefix", lambda: ())
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    connections = []
    waiter = threading.Thread(target=lambda: connections.append(_accept(server)))
    waiter.start()
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)"
    )
    result = run_python(code, timeout=5)
    waiter.join()
    server.close()
    assert result.passed is False
    assert connections == [None]  # nothing connected to the server
    assert run_python(f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))").passed is False


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


def test_retention_and_agreement_arithmetic():
    ar = {"facts": 1.0, "python": 0.5, "word": 0.0}
    mode = {"facts": 0.5, "python": 1.0, "word": 0.25}
    assert metrics.quality_retention(mode, ar) == pytest.approx((0.5 + 2.0) / 2)  # word: AR 0, left out
    assert metrics.quality_retention(ar, ar) == 1.0
    assert metrics.quality_retention(mode, {"facts": 0.0}) is None
    assert metrics.quality_retention({}, {"facts": 0.8}) == 0.0
    agree = metrics.agreement([[1, 2, 3], [1, 2], [9]], [[1, 2, 3], [1, 5], [1]])
    assert agree == {"exact_match": pytest.approx(1 / 3), "mean_common_prefix": pytest.approx((3 + 1 + 0) / 3)}
    assert metrics.accuracy_by_category(["a", "a", "b", "c"], [True, False, True, None]) == {"a": 0.5, "b": 1.0}
    assert metrics.distinct_n("a b a b") == pytest.approx(2 / 3)
    assert metrics.distinct_n("one") == 0.0
    assert metrics.mean_perplexity([0.0, 2.0]) == pytest.approx(2.718281828, rel=1e-6)


def test_builtin_suite_shape():
    tasks = builtin_tasks()
    categories = {t.category for t in tasks}
    assert len(tasks) >= 150 and len(categories) >= 6
    assert len({t.id for t in tasks}) == len(tasks)
    assert {"facts", "arithmetic", "sequence", "copy-format", "word", "python", "long-form"} <= categories
    arithmetic = next(t for t in tasks if t.prompt.startswith("What is 12 plus 7"))
    assert score(arithmetic, "12 plus 7 is 19.") and score(arithmetic, "19")
    assert not score(arithmetic, "It is 119.") and not score(arithmetic, "It is 190") and not score(arithmetic, "19.5")


def test_prompt_file_is_read_and_checked(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"id": "a", "category": "math", "prompt": "1+1?", "check": "regex", "answer": r"\b2\b"})
        + "\n\n"
        + json.dumps({"id": "b", "category": "essay", "prompt": "Write.", "check": "none"})
        + "\n"
    )
    tasks = load_prompts(good)
    assert [t.id for t in tasks] == ["a", "b"] and tasks[1].max_new_tokens == 64
    for line, match in [
        ('{"id": "a", "category": "c", "prompt": "p"}', "missing field"),
        ('{"id": "a", "category": "c", "prompt": "p", "check": "vibes", "answer": "x"}', "unknown check"),
        ('{"id": "a", "category": "c", "prompt": "p", "check": "regex", "answer": "(("}', "bad regex"),
        ('{"id": "a", "category": "c", "prompt": "p", "check": "none", "extra": 1}', "unknown field"),
        ("not json", "bad.jsonl:1: not JSON"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(TwoTowerError, match=match):
            load_prompts(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(good.read_text().replace('"id": "b"', '"id": "a"'))
    with pytest.raises(TwoTowerError, match="duplicate id"):
        load_prompts(dup)


def test_operating_points_put_ar_first_and_respect_the_trained_block():
    points = operating_points(["mock-ar", "diffusion"], [None, 4], [0.5, 0.9], [0.0], trained_block_size=8)
    assert points[0] == AR and points[1] == OperatingPoint("mock-ar")
    assert [(p.block_size, p.threshold) for p in points[2:]] == [(8, 0.5), (8, 0.9), (4, 0.5), (4, 0.9)]
    with pytest.raises(TwoTowerError, match="exceeds the trained block size"):
        operating_points(["diffusion"], [16], [0.8], [0.0], trained_block_size=8)


def test_verify_runs_once_per_tree_size_and_the_point_carries_it():
    points = operating_points(["diffusion", "verify"], [None], [0.8], [0.0], trained_block_size=8, trees=(0, 16))
    assert [(p.mode, p.tree_nodes) for p in points] == [("ar", 0), ("diffusion", 0), ("verify", 0), ("verify", 16)]
    assert points[3].label.endswith("tree=16") and points[3].options()["tree_nodes"] == 16
    assert "tree_nodes" not in points[2].options()


def test_verify_runs_once_per_draft_source_and_trees_only_where_a_source_builds_them():
    points = operating_points(["verify"], [None], [0.8], [0.0], 8, trees=(0, 16), drafts=("auto", "denoiser", "lookup"))
    assert [(p.draft, p.tree_nodes) for p in points[1:]] == [
        ("auto", 0),
        ("auto", 16),
        ("denoiser", 0),
        ("denoiser", 16),
        ("lookup", 0),
    ]
    assert points[1].label == "verify S=8 g=0.8" and "draft" not in points[1].options()
    assert points[4].label == "verify S=8 g=0.8 draft=denoiser tree=16" and points[4].options()["draft"] == "denoiser"
    diffusion = operating_points(["diffusion"], [None], [0.8], [0.0], 8, drafts=("denoiser",))
    assert [p.draft for p in diffusion] == ["auto", "auto"]  # only verify mode drafts


def test_bench_times_each_draft_source_as_asked(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--modes", "verify", "--drafts", "denoiser,lookup", "--batch-sizes", "1", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    rows = {r["point"]: r for r in json.loads(out.read_text())["rows"]}
    denoiser, lookup = rows["verify S=16 g=0.8 draft=denoiser"], rows["verify S=16 g=0.8 draft=lookup"]
    assert denoiser["draft_sources"]["lookup"] == 0 and denoiser["draft_sources"]["denoiser"] > 0
    assert lookup["draft_sources"]["denoiser"] == 0 and lookup["draft"] == "lookup"
    assert denoiser["exact_match_vs_ar"] == lookup["exact_match_vs_ar"] == 1.0  # fp32: lossless either way
    with pytest.raises(SystemExit):
        main([*args[:4], "--drafts", "denoiser,guess"])


def test_eval_on_a_tiny_model_mock_ar_retains_everything():
    model, tokenizer = tiny_two_tower(block_size=4), tiny_tokenizer()
    tasks = [Task(f"w{i}", "any-word", " ".join(f"w{j}" for j in p), "regex", r"w\d") for i, p in enumerate(PROMPTS)]
    tasks += [Task("t3", "digit-3", "w7 w8", "regex", r"w3\b"), Task("lf", "long-form", "w9 w10 w11", "none")]
    judge = Judge(tiny_backbone(seed=3), tokenizer, "tiny")
    points = [AR, OperatingPoint("mock-ar"), OperatingPoint("diffusion", 4, 0.5)]
    report = run_eval(
        model,
        tokenizer,
        tasks,
        points,
        judge,
        batch_size=2,
        eos=[],
        progress=False,
        encode=lambda text: tokenizer(text)["input_ids"],
    )
    ar, mock, diffusion = report["points"]
    assert ar["accuracy"]["any-word"] == 1.0 and ar["retention"] == 1.0
    assert mock["retention"] == 1.0 and mock["exact_match"] == 1.0 and mock["judge_ppl_ratio"] == 1.0
    assert mock["mean_common_prefix"] == ar["mean_common_prefix"] > 0
    assert diffusion["tokens_per_nfe"] >= 1.0 and diffusion["judge_ppl"] > 0
    assert 0.0 <= diffusion["distinct2"] <= 1.0
    assert set(report["points"][0]["passed"]) == {t.id for t in tasks if t.check != "none"}


def test_bench_quick_writes_a_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--modes", "mock-ar,diffusion,verify", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["torch_threads"] == torch.get_num_threads() and env["dtype"] == "float32" and "command" in env
    rows = {(r["point"], r["batch_size"]): r for r in report["rows"]}
    for batch in (1, 8):
        assert rows[("ar", batch)]["speedup_vs_generate_ar"] == 1.0
        assert rows[("hf_generate", batch)]["tokens_per_second"] > 0
        diffusion = rows[("diffusion S=16 g=0.8", batch)]
        # every context pass commits at least one token (batched passes serve every row)
        assert diffusion["tokens_per_second"] > 0 and diffusion["context_passes_per_token"] <= 1 / batch
        assert diffusion["speedup_vs_hf_generate"] > 0
        verify = rows[("verify S=16 g=0.8", batch)]
        assert verify["exact_match_vs_ar"] == 1.0  # fp32: lossless
        assert sum(verify["draft_sources"].values()) > 0 and verify["tokens_per_cycle"] >= 1.0
    assert rows[("hf_generate_lookup", 1)]["tokens_per_second"] > 0  # the prompt-lookup baseline, batch 1
    assert set(report["context_pass_ms"]) == {"1", "2", "4", "8", "16", "17", "exact_17", "tree_17"}
    (costs,) = report["pass_cost_ms"]  # --quick: the benchmark's own dtype only
    assert costs["dtype"] == "float32" and costs["ratio_17_1"] > 0 and costs["denoiser"] > 0
    assert costs["exact_17"] > 0 and costs["tree_17"] > 0  # verify's exact passes, chain and tree
    assert any("llama.cpp skipped" in n for n in report["notes"])
    assert "tok/s" in capsys.readouterr().out


def test_bench_takes_the_points_in_turn_on_each_batch_of_prompts(monkeypatch):
    """A B A B ...: a machine whose speed drifts moves every point alike."""
    from twotower.eval import speed

    calls = []
    real = speed.generate_replies

    def recording(model, tokenizer, prompts, *args, **kwargs):
        calls.append((args[1].mode, len(prompts)))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(speed, "generate_replies", recording)
    points = [AR, OperatingPoint("mock-ar")]
    found = speed.interleaved(tiny_two_tower(), PROMPTS[:3], points, 2, 4, [])
    assert calls == [("ar", 2), ("mock-ar", 2), ("ar", 1), ("mock-ar", 1)]
    assert [len(found[p][0]) for p in points] == [3, 3]
    assert found[AR][1]["new_tokens"] == sum(len(r.tokens) for r in found[AR][0])


def test_bench_batches_never_mix_categories_and_reports_each():
    """With a category per prompt, a batch holds one category, and every point gets a row per
    category whose counts add up to its overall row; AR's own rows are the reference."""
    from twotower.eval import speed

    labels = ["a", "a", "a", "b", "c", "c"]
    chunks = speed.batches(list(range(6)), labels, 2)
    assert chunks == [([0, 1], "a"), ([2], "a"), ([3], "b"), ([4, 5], "c")]
    points = [AR, OperatingPoint("verify", threshold=0.5)]
    prompts = [*PROMPTS, [30, 31], [50, 51, 52]]
    with pytest.raises(TwoTowerError, match="a label per prompt"):
        speed.run_bench(tiny_two_tower(), prompts, points, (2,), 6, hf=False, progress=False, labels=labels[:5])
    report = speed.run_bench(tiny_two_tower(), prompts, points, (2,), 6, hf=False, progress=False, labels=labels)
    rows = report["category_rows"]
    assert [(r["category"], r["point"]) for r in rows] == [(c, p.label) for p in points for c in "abc"]
    for point in points:
        overall = next(r for r in report["rows"] if r["point"] == point.label)
        mine = [r for r in rows if r["point"] == point.label]
        assert sum(r["new_tokens"] for r in mine) == overall["new_tokens"]
        assert sum(r["seconds"] for r in mine) == pytest.approx(overall["seconds"])
    assert all(r["speedup_vs_generate_ar"] == 1.0 and r["exact_match_vs_ar"] == 1.0 for r in rows if r["point"] == AR.label)
    assert all(r["exact_match_vs_ar"] == 1.0 for r in rows)  # fp32 verify is AR's output


def test_a_llama_cpp_that_crashes_is_a_note_not_the_end_of_the_bench(tmp_path, monkeypatch):
    """llama.cpp runs in a child process: one killed by SIGILL (a build for CPU features the
    machine refuses) leaves a note, and the benchmark's own rows."""
    from twotower.eval.speed import run_bench

    fake = tmp_path / "llama_cpp"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, signal\n\nclass Llama:\n    def __init__(self, **kwargs):\n        os.kill(os.getpid(), signal.SIGILL)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # a spawned child starts from the parent's sys.path
    prompts = [p for p in PROMPTS[:2]]
    report = run_bench(tiny_two_tower(), prompts, [AR], (1,), 4, hf=False, gguf=str(tmp_path / "m.gguf"), progress=False)
    assert any("llama.cpp skipped: it crashed" in n for n in report["notes"])
    assert report["rows"][0]["tokens_per_second"] > 0


def test_sweep_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    points = [{"mode": "ar", "block_size": None, "threshold": 0.8, "retention": 1.0, "tokens_per_second": 20.0}]
    points += [
        {"mode": "diffusion", "block_size": s, "threshold": g, "retention": 1 - g / 4, "tokens_per_second": 20 * s * g}
        for s in (4, 8)
        for g in (0.5, 0.9)
    ]
    path = tmp_path / "curve.png"
    assert plot_curve(points, str(path)) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
