"""`twotower eval` and `twotower bench`: quality retention and speed, side by side, one process.

Every operating point (mode, block size, threshold, temperature) runs the same prompts on the
same weights and dtype; AR greedy always runs first and is the reference for accuracy ratios,
agreement and speed-ups.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from twotower.config import BLOCK_MODES, TwoTowerError, resolve_block_size
from twotower.eval import metrics
from twotower.eval.checks import score
from twotower.eval.tasks import Task
from twotower.generate import generate


@dataclass(frozen=True)
class OperatingPoint:
    mode: str
    block_size: int | None = None
    threshold: float = 0.8
    temperature: float = 0.0
    seed: int = 0

    @property
    def label(self) -> str:
        if self.mode in BLOCK_MODES:
            text = f"{self.mode} S={self.block_size} g={self.threshold}"
        else:
            text = self.mode
        return text + (f" T={self.temperature}" if self.temperature else "")

    def options(self) -> dict:
        opts = {"temperature": self.temperature, "seed": self.seed if self.temperature else None}
        if self.mode in BLOCK_MODES:
            opts.update(block_size=self.block_size, confidence_threshold=self.threshold)
        return opts


AR = OperatingPoint("ar")


def operating_points(modes, block_sizes, thresholds, temperatures, trained_block_size: int) -> list[OperatingPoint]:
    """AR greedy first (the reference), then every requested combination (a block size of None
    is the trained block size)."""
    points = [AR]
    for temperature in temperatures:
        for mode in modes:
            if mode in BLOCK_MODES:
                for size in block_sizes:
                    size = resolve_block_size(size, trained_block_size)  # None: the trained block size
                    points += [OperatingPoint(mode, size, g, temperature) for g in thresholds]
            else:
                points.append(OperatingPoint(mode, None, 0.8, temperature))
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


@dataclass
class Reply:
    tokens: list[int]
    text: str
    nfe: int


def generate_replies(model, tokenizer, prompts: list[list[int]], max_new: list[int], point: OperatingPoint,
                     batch_size: int, eos: list[int], bar=None) -> tuple[list[Reply], dict]:
    """Replies in prompt order, generated in batches of prompts that share max_new_tokens.
    Returns the replies and the pass counts / seconds summed over batches."""
    replies: list[Reply | None] = [None] * len(prompts)
    totals = {"seconds": 0.0, "new_tokens": 0, "nfe": 0, "denoiser_passes": 0, "context_passes": 0}
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(max_new):
        by_length.setdefault(n, []).append(i)
    for n, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            group = indices[start:start + batch_size]
            result = generate(model, point.mode, [prompts[i] for i in group], max_new_tokens=n, eos_token_id=eos,
                              **point.options())
            for row, i in enumerate(group):
                toks = result.tokens[row]
                text = tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else ""
                replies[i] = Reply(toks, text, result.row_nfe[row])
            for key in ("seconds", "new_tokens", "nfe", "denoiser_passes", "context_passes"):
                totals[key] += getattr(result, key)
            _add_counts(totals, result.details)
            if bar is not None:
                bar.update(len(group))
    return replies, totals


def _add_counts(totals: dict, details: dict) -> None:
    """Sum a mode's integer statistics (verify: cycles, drafted, draft sources) over batches."""
    for key, value in details.items():
        if isinstance(value, int):
            totals[key] = totals.get(key, 0) + value
        elif isinstance(value, dict):
            _add_counts(totals.setdefault(key, {}), value)


# ------------------------------------------------------------------------------------ eval
def run_eval(model, tokenizer, tasks: list[Task], points: list[OperatingPoint], judge=None, batch_size: int = 8,
             eos: list[int] | None = None, encode=None, progress: bool = True) -> dict:
    """Accuracy per category, agreement with AR, judge perplexity and distinct-2 on long-form,
    quality retention, for every operating point. points[0] must be AR greedy."""
    if points[0] != AR:
        raise TwoTowerError("the first operating point must be AR greedy (the reference)")
    prompts = [encode(t.prompt) for t in tasks]
    max_new = [t.max_new_tokens for t in tasks]
    categories = [t.category for t in tasks]
    long_form = [i for i, t in enumerate(tasks) if t.check == "none"]
    rows, reference = [], None
    bar = tqdm(total=len(points) * len(tasks), desc="eval", unit="prompt", disable=not progress)
    for point in points:
        bar.set_postfix_str(point.label)
        replies, totals = generate_replies(model, tokenizer, prompts, max_new, point, batch_size, eos or [], bar)
        passed = [score(task, reply.text) for task, reply in zip(tasks, replies)]
        if reference is None:
            reference = replies
        row = {
            "point": point.label, **asdict(point),
            "accuracy": metrics.accuracy_by_category(categories, passed),
            **metrics.agreement([r.tokens for r in replies], [r.tokens for r in reference]),
            "tokens_per_nfe": totals["new_tokens"] / max(totals["nfe"], 1),
            "tokens_per_second": totals["new_tokens"] / max(totals["seconds"], 1e-9),
            "new_tokens": totals["new_tokens"],
            "passed": {t.id: p for t, p in zip(tasks, passed) if p is not None},
        }
        checked = [p for p in passed if p is not None]
        row["overall_accuracy"] = sum(checked) / len(checked) if checked else None
        if long_form:
            row["distinct2"] = sum(metrics.distinct_n(replies[i].text) for i in long_form) / len(long_form)
            if judge is not None:
                nll = [judge.nll_per_token(tasks[i].prompt, replies[i].text) for i in long_form]
                row["judge_ppl"] = metrics.mean_perplexity(nll)
        row["replies"] = {t.id: r.text for t, r in zip(tasks, replies)}
        rows.append(row)
    bar.close()
    ar_row = rows[0]
    for row in rows:
        row["retention"] = metrics.quality_retention(row["accuracy"], ar_row["accuracy"])
        if row.get("judge_ppl") and ar_row.get("judge_ppl"):
            row["judge_ppl_ratio"] = row["judge_ppl"] / ar_row["judge_ppl"]
    return {"tasks": len(tasks), "categories": sorted(set(categories)), "judge": getattr(judge, "name", None),
            "batch_size": batch_size, "points": rows}


# ----------------------------------------------------------------------------------- bench
LOOKUP_TOKENS = 10  # draft length of the prompt-lookup baselines (transformers' and llama.cpp's default)


def _time_hf_generate(backbone, prompts, batch_size, max_new_tokens, eos, pad_id, lookup: bool = False) -> dict:
    """transformers' greedy generate; with `lookup`, its prompt-lookup decoding (batch 1 only)."""
    from twotower.generate.common import left_pad

    extra = {"prompt_lookup_num_tokens": LOOKUP_TOKENS} if lookup else {}
    tokens, seconds = 0, 0.0
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_id)
        begin = time.perf_counter()
        out = backbone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos or None, pad_token_id=pad_id, **extra)
        seconds += time.perf_counter() - begin
        for row in out[:, ids.shape[1]:].tolist():
            tokens += next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) if eos else len(row)
    return {"new_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}


def _time_llama_cpp(gguf: str, prompts, max_new_tokens: int, threads: int, lookup: bool = False) -> dict:
    """llama.cpp greedy on the same GGUF; with `lookup`, its n-gram (prompt lookup) draft."""
    from llama_cpp import Llama

    draft = None
    if lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS)
    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, draft_model=draft)
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        llm.reset()
        begin = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        seconds += time.perf_counter() - begin
        tokens += out["usage"]["completion_tokens"]
    return {"new_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}


def pass_cost(model, prompt: list[int], widths=(1, 2, 4, 8, 16), repeats: int = 3) -> dict[int, float]:
    """Milliseconds of one context-tower pass over `width` new positions after `prompt`
    (batch 1, best of `repeats`). Whether parallel positions are nearly free (GPU, CPUs with
    native bf16) or cost in proportion (CPUs without) decides what drafting can gain."""
    ids = torch.tensor([prompt])
    out = {}
    for width in widths:
        best = float("inf")
        for _ in range(repeats):
            cache, _ = model.context_prefill(ids, torch.ones_like(ids), logits=None)
            begin = time.perf_counter()
            model.context_extend(cache, ids[:, :1].expand(1, width).contiguous(), logits="all")
            best = min(best, time.perf_counter() - begin)
        out[width] = round(best * 1000, 2)
    return out


def run_bench(model, prompts: list[list[int]], points: list[OperatingPoint], batch_sizes=(1, 8),
              max_new_tokens: int = 128, eos: list[int] | None = None, hf: bool = True, gguf: str | None = None,
              progress: bool = True, lookup_baselines: bool | None = None) -> dict:
    """Tokens/s, NFE and context passes per token for every point and batch size, plus
    transformers' generate and (batch 1) llama.cpp on the same prompts; speed-ups over each.
    With verify mode among the points (or `lookup_baselines`), both baselines also run with
    their prompt-lookup drafts (batch 1)."""
    if lookup_baselines is None:
        lookup_baselines = any(p.mode == "verify" for p in points)
    eos = eos or []
    pad = eos[0] if eos else 0
    rows, notes = [], []
    steps = len(points) * len(batch_sizes)
    bar = tqdm(total=steps, desc="bench", unit="run", disable=not progress)
    generate(model, "ar", prompts[:1], max_new_tokens=4)  # warm-up (allocator, threads)
    costs = pass_cost(model, prompts[0])
    for batch in batch_sizes:
        baselines = {}
        if hf:
            baselines["hf_generate"] = _time_hf_generate(model.context_tower, prompts, batch, max_new_tokens, eos, pad)
            if batch == 1 and lookup_baselines and model.family.stateful:
                notes.append("transformers' prompt lookup skipped: its assisted generation refuses stateful "
                             "(Mamba) models")
            elif batch == 1 and lookup_baselines:  # transformers' assisted decoding is batch 1 only
                baselines["hf_generate_lookup"] = _time_hf_generate(model.context_tower, prompts, 1, max_new_tokens,
                                                                    eos, pad, lookup=True)
        if batch == 1 and gguf:
            try:
                threads = torch.get_num_threads()
                baselines["llama_cpp"] = _time_llama_cpp(gguf, prompts, max_new_tokens, threads)
                if lookup_baselines:
                    baselines["llama_cpp_lookup"] = _time_llama_cpp(gguf, prompts, max_new_tokens, threads, lookup=True)
            except ImportError:
                notes.append("llama.cpp skipped: llama-cpp-python is not installed (pip install 'twotower[bench]')")
        ar_tps, ar_replies = None, None
        for point in points:
            bar.set_postfix_str(f"{point.label} batch={batch}")
            replies, totals = generate_replies(model, None, prompts, [max_new_tokens] * len(prompts), point, batch, eos)
            tps = totals["new_tokens"] / max(totals["seconds"], 1e-9)
            if point == AR:
                ar_tps, ar_replies = tps, replies
            row = {
                "point": point.label, **asdict(point), "batch_size": batch, "new_tokens": totals["new_tokens"],
                "seconds": totals["seconds"], "tokens_per_second": tps,
                "nfe_per_token": totals["nfe"] / max(totals["new_tokens"], 1),
                "context_passes_per_token": totals["context_passes"] / max(totals["new_tokens"], 1),
                "tokens_per_nfe": totals["new_tokens"] / max(totals["nfe"], 1),
                "speedup_vs_generate_ar": tps / ar_tps if ar_tps else None,
                "exact_match_vs_ar": metrics.agreement([r.tokens for r in replies], [r.tokens for r in ar_replies])[
                    "exact_match"] if ar_replies else None,
            }
            if "draft_sources" in totals:  # verify mode
                row.update(draft_sources=totals["draft_sources"], cycles=totals["cycles"],
                           draft_acceptance=totals["accepted_drafts"] / max(totals["drafted"], 1),
                           tokens_per_cycle=totals["new_tokens"] / max(sum(totals["draft_sources"].values()), 1))
            for name, base in baselines.items():
                row[f"speedup_vs_{name}"] = tps / base["tokens_per_second"]
            rows.append(row)
            bar.update(1)
        for name, base in baselines.items():
            rows.append({"point": name, "mode": name, "batch_size": batch, **base})
    bar.close()
    if gguf is None:
        notes.append("llama.cpp skipped: the model was not loaded from a GGUF file")
    return {"rows": rows, "notes": notes, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "context_pass_ms": costs}


# ----------------------------------------------------------------------------------- output
def environment(dtype: torch.dtype, model_ref: str) -> dict:
    import transformers

    return {
        "command": " ".join(["twotower", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("twotower")
        else " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."), "model": model_ref,
    }


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Fixed-width text table; columns: (header, key). Floats print with 3 significant places."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    body = [[cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, (h, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)


def plot_curve(points: list[dict], path: str) -> str | None:
    """tokens/s against quality retention, one line per block size. Returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'twotower[bench]')"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, group in _group_by_block(points).items():
        group = sorted(group, key=lambda p: p["threshold"])
        ax.plot([p["retention"] * 100 for p in group], [p["tokens_per_second"] for p in group], "o-", label=label)
        for p in group:
            ax.annotate(f"{p['threshold']}", (p["retention"] * 100, p["tokens_per_second"]), fontsize=7)
    for p in points:
        if p["mode"] != "diffusion":
            ax.scatter([p["retention"] * 100], [p["tokens_per_second"]], marker="s")
            ax.annotate(p["mode"], (p["retention"] * 100, p["tokens_per_second"]), fontsize=8)
    ax.set_xlabel("quality retention vs AR (%)")
    ax.set_ylabel("tokens / s")
    ax.set_title("speed / quality (labels: confidence threshold)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _group_by_block(points: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in points:
        if p["mode"] == "diffusion" and p.get("retention") is not None:
            groups.setdefault(f"block {p['block_size']}", []).append(p)
    return groups
