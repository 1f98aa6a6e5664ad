"""Speed of every operating point (`twotower bench`): tokens/s at each batch size, passes per
token, agreement with AR, next to transformers' generate and llama.cpp on the same prompts,
and the cost of one context-tower pass by its number of new positions."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from twotower.config import TwoTowerError
from twotower.eval import metrics
from twotower.eval.points import AR, OperatingPoint, add_counts, generate_replies
from twotower.generate import generate
from twotower.generate.draft import DraftMemory

LOOKUP_TOKENS = 10  # draft length of the prompt-lookup baselines (transformers' and llama.cpp's default)


def _time_hf_generate(backbone, prompts, batch_size, max_new_tokens, eos, pad_id, lookup: bool = False) -> dict:
    """transformers' greedy generate; with `lookup`, its prompt-lookup decoding (batch 1 only)."""
    from twotower.generate.common import left_pad

    extra = {"prompt_lookup_num_tokens": LOOKUP_TOKENS} if lookup else {}
    tokens, seconds = 0, 0.0
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad_id)
        begin = time.perf_counter()
        out = backbone.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos or None,
            pad_token_id=pad_id,
            **extra,
        )
        seconds += time.perf_counter() - begin
        for row in out[:, ids.shape[1] :].tolist():
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


def _llama_cpp_baselines(gguf: str, prompts, max_new_tokens: int, threads: int, lookup: bool) -> dict:
    """llama.cpp greedy, and with `lookup` its prompt-lookup draft too, timed in a child process:
    llama.cpp's native code can die of an instruction the machine refuses (a build for AMX on a
    VM that does not grant it: SIGILL), which must not take the benchmark with it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        found = {"llama_cpp": pool.submit(_time_llama_cpp, gguf, prompts, max_new_tokens, threads).result()}
        if lookup:
            found["llama_cpp_lookup"] = pool.submit(_time_llama_cpp, gguf, prompts, max_new_tokens, threads, True).result()
    return found


def interleaved(model, prompts, points, batch: int, max_new_tokens: int, eos, bar=None, labels=None, memory=None) -> dict:
    """Every point over the prompts, in batches of `batch`, taking the points in turn on each
    batch of prompts (A B A B ...), so that a machine whose speed drifts during the run moves
    every point alike and their ratios stay meaningful. labels: one per prompt (its category):
    a batch holds prompts of one label only, and each point's totals are also kept per label.
    memory: the run's DraftMemory, which verify mode starts from and adds to.
    Returns point -> (replies, totals, {label: totals})."""
    labels = labels or [None] * len(prompts)
    found = {point: ([], {}, {}) for point in points}
    for chunk, label in batches(prompts, labels, batch):
        for point in points:
            if bar is not None:
                bar.set_postfix_str(f"{point.label} batch={batch}")
            replies, totals = generate_replies(
                model, None, chunk, [max_new_tokens] * len(chunk), point, batch, eos, memory=memory
            )
            found[point][0].extend(replies)
            add_counts(found[point][1], totals, numbers=(int, float))
            add_counts(found[point][2].setdefault(label, {}), totals, numbers=(int, float))
            if bar is not None:
                bar.update(1)
    return found


def batches(prompts: list, labels: list, batch: int) -> list[tuple[list, object]]:
    """The prompts in order, in batches of at most `batch` that never span two labels."""
    out, start = [], 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and end - start < batch and labels[end] == labels[start]:
            end += 1
        out.append((prompts[start:end], labels[start]))
        start = end
    return out


PASS_WIDTHS = (1, 2, 4, 8, 16, 17)
VERIFY_WIDTH = 17  # verify's widest pass: the pending token and a block of 16 drafts, or a tree of 16 nodes


@torch.no_grad()
def denoiser_pass_cost(model, prompt: list[int], repeats: int = 3, draft_vocab: int | None = None) -> float | None:
    """Milliseconds of one denoiser pass over a block of the trained size (batch 1, best of
    `repeats`), logits of every slot included: what a diffusion step costs. With draft_vocab,
    verify's draft pass instead: logits of the drafted slots only, over the draft head of that
    many tokens (None when the model has no draft vocabulary)."""
    head = None if draft_vocab is None else model.draft_head(draft_vocab)
    if draft_vocab is not None and head is None:
        return None
    from twotower.generate.common import start_run
    from twotower.generate.mask_diffusion import DiffusionDecoder

    best = float("inf")
    for _ in range(repeats):
        run = start_run(model, [prompt], None, "diffusion", {"max_new_tokens": 2 * model.config.block_size})
        decoder = DiffusionDecoder(model, run)
        for _ in decoder.start():
            pass
        den = model.denoiser_device
        block = torch.full((1, model.config.block_size), model.mask_token_id, device=den)
        block[:, 0] = decoder.logits.argmax(-1).to(den)
        begin = time.perf_counter()
        reads, t = model.layout.reads(decoder.cache, den), torch.ones(1, device=den)
        model.denoise_block(reads, block, t, head=head, first=0 if head is None else 1)
        best = min(best, time.perf_counter() - begin)
    return round(best * 1000, 2)


def pass_cost(model, prompt: list[int], widths=PASS_WIDTHS, repeats: int = 3, verify_width: int | None = None) -> dict:
    """Milliseconds of one context-tower pass over `width` new positions after `prompt`
    (batch 1, best of `repeats`). Whether parallel positions are nearly free (GPU, CPUs with
    native bf16) or cost in proportion (CPUs without) decides what drafting can gain. Eager
    passes at every width, also for a model with compiled ones (`compile_steps`, which cover
    only the widths decoding makes), so that the ratios compare like with like. With
    verify_width W, also verify's exact pass over W positions at batch 1 ("exact_W": a chain,
    each position as a one-token pass reads it) and, where the model verifies token trees, over
    a binary tree of W nodes ("tree_W": node i follows node (i - 1) // 2)."""
    ids = torch.tensor([prompt])
    out = {}

    def best_of(width: int, **how) -> float:
        best = float("inf")
        for _ in range(repeats):
            cache, _ = model.context_prefill(ids, torch.ones_like(ids), logits=None)
            begin = time.perf_counter()
            model.context_extend(cache, ids[:, :1].expand(1, width).contiguous(), logits="all", **how)
            best = min(best, time.perf_counter() - begin)
        return round(best * 1000, 2)

    compiled, model.step_layers = model.step_layers, None
    try:
        for width in widths:
            out[width] = best_of(width)
        if verify_width:
            out[f"exact_{verify_width}"] = best_of(verify_width, exact=True)
            if model.verifies_trees:
                parents = torch.tensor([[-1] + [(i - 1) // 2 for i in range(1, verify_width)]])
                out[f"tree_{verify_width}"] = best_of(verify_width, exact=True, parents=parents)
    finally:
        model.step_layers = compiled
    return out


def run_bench(
    model,
    prompts: list[list[int]],
    points: list[OperatingPoint],
    batch_sizes=(1, 8),
    max_new_tokens: int = 128,
    eos: list[int] | None = None,
    hf: bool = True,
    gguf: str | None = None,
    progress: bool = True,
    lookup_baselines: bool | None = None,
    labels: list[str] | None = None,
) -> dict:
    """Tokens/s, NFE and context passes per token for every point and batch size, plus
    transformers' generate and (batch 1) llama.cpp on the same prompts; speed-ups over each.
    With verify mode among the points (or `lookup_baselines`), both baselines also run with
    their prompt-lookup drafts (batch 1). labels: a category per prompt; then batches hold one
    category each and "category_rows" gives every point's figures per category too."""
    if lookup_baselines is None:
        lookup_baselines = any(p.mode == "verify" for p in points)
    eos = eos or []
    pad = eos[0] if eos else 0
    rows, category_rows, notes = [], [], []
    labels = labels or [None] * len(prompts)
    if len(labels) != len(prompts):
        raise TwoTowerError(f"a label per prompt: {len(labels)} labels for {len(prompts)} prompts")
    steps = len(points) * sum(len(batches(prompts, labels, b)) for b in batch_sizes)
    bar = tqdm(total=steps, desc="bench", unit="batch", disable=not progress)
    generate(model, "ar", prompts[:1], max_new_tokens=4)  # warm-up (allocator, threads)
    costs = pass_cost(model, prompts[0], verify_width=VERIFY_WIDTH)
    memory = DraftMemory()  # verify's: a later prompt starts from what the earlier ones measured
    for batch in batch_sizes:
        baselines = {}
        if hf:
            baselines["hf_generate"] = _time_hf_generate(model.context_tower, prompts, batch, max_new_tokens, eos, pad)
            if batch == 1 and lookup_baselines and model.family.stateful:
                notes.append("transformers' prompt lookup skipped: its assisted generation refuses stateful (Mamba) models")
            elif batch == 1 and lookup_baselines:  # transformers' assisted decoding is batch 1 only
                baselines["hf_generate_lookup"] = _time_hf_generate(
                    model.context_tower, prompts, 1, max_new_tokens, eos, pad, lookup=True
                )
        if batch == 1 and gguf:
            from concurrent.futures.process import BrokenProcessPool

            try:
                baselines.update(_llama_cpp_baselines(gguf, prompts, max_new_tokens, torch.get_num_threads(), lookup_baselines))
            except ImportError:
                notes.append("llama.cpp skipped: llama-cpp-python is not installed (pip install 'twotower[bench]')")
            except BrokenProcessPool:
                notes.append(
                    "llama.cpp skipped: it crashed (an instruction this CPU or VM refuses, e.g. a build for AMX where "
                    "AMX is not granted: rebuild with CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON', docs/benchmarks.md)"
                )
        measured = interleaved(model, prompts, points, batch, max_new_tokens, eos, bar, labels, memory)
        ar = measured.get(AR)
        for point in points:
            replies, totals, by_label = measured[point]
            row = {"point": point.label, **asdict(point), "batch_size": batch, **speed_figures(replies, totals, ar)}
            for name, base in baselines.items():
                row[f"speedup_vs_{name}"] = row["tokens_per_second"] / base["tokens_per_second"]
            rows.append(row)
            for label in by_label if labels[0] is not None else ():
                mine = [r for r, lab in zip(replies, labels) if lab == label]
                theirs = None if ar is None else ([r for r, lab in zip(ar[0], labels) if lab == label], ar[2][label])
                figures = speed_figures(mine, by_label[label], theirs)
                category_rows.append({"category": label, "point": point.label, "batch_size": batch, **figures})
        for name, base in baselines.items():
            rows.append({"point": name, "mode": name, "batch_size": batch, **base})
    bar.close()
    if gguf is None:
        notes.append("llama.cpp skipped: the model was not loaded from a GGUF file")
    report = {"rows": rows, "notes": notes, "prompts": len(prompts), "max_new_tokens": max_new_tokens, "context_pass_ms": costs}
    if category_rows:
        report["category_rows"] = category_rows
    return report


def speed_figures(replies, totals: dict, ar=None) -> dict:
    """A point's figures from its replies and summed totals; ar: AR's replies and totals on the
    same prompts (first two entries), for the speed-up and the exact matches (None: AR did not run)."""
    tps = totals["new_tokens"] / max(totals["seconds"], 1e-9)
    ar_tps = None if ar is None else ar[1]["new_tokens"] / max(ar[1]["seconds"], 1e-9)
    row = {
        "new_tokens": totals["new_tokens"],
        "seconds": totals["seconds"],
        "tokens_per_second": tps,
        "nfe_per_token": totals["nfe"] / max(totals["new_tokens"], 1),
        "context_passes_per_token": totals["context_passes"] / max(totals["new_tokens"], 1),
        "tokens_per_nfe": totals["new_tokens"] / max(totals["nfe"], 1),
        "speedup_vs_generate_ar": tps / ar_tps if ar_tps else None,
        "exact_match_vs_ar": metrics.agreement([r.tokens for r in replies], [r.tokens for r in ar[0]])["exact_match"]
        if ar is not None
        else None,
    }
    if "draft_sources" in totals:  # verify mode
        row.update(
            draft_sources=totals["draft_sources"],
            cycles=totals["cycles"],
            draft_acceptance=totals["accepted_drafts"] / max(totals["drafted"], 1),
            tokens_per_cycle=totals["new_tokens"] / max(sum(totals["draft_sources"].values()), 1),
        )
    return row
