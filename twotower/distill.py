"""`twotower distill`: self-distilled training data from the backbone itself (Magpie-style).

For every row, the instruct model writes a user turn (sampled after its chat template's user
header, half the time after a task verb such as "Write"), then answers it greedily under the
chat template, exactly as AR mode would. The rows are what the denoiser should learn to
imitate: this backbone's own replies, a user's own fine-tune included.

Batched and seeded: batch k depends only on (seed, k), so a killed run resumed with the same
command writes the same file as an uninterrupted one. Output: JSONL, one object per line,
{"id", "prompt", "response", "response_tokens"}, readable by `twotower train` (and `datasets`);
or, when `out` names a folder (no .jsonl suffix), that JSONL as FOLDER/rows.jsonl plus token
shards of every row's chat-formatted ids (`twotower.data.TokenShards`), which `twotower train`
reads without tokenising again. User turns equal to a held-out evaluation prompt, empty or
repeated ones are left out. `max_minutes` stops after the batch that crosses the limit (the
same command goes on from there): the runs of a GPU script come in steps of a few minutes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from twotower.config import TwoTowerError
from twotower.data import SHARD_ROWS_FILE, TokenShards, heldout_prompts, normalise, row_tokens
from twotower.generate import generate_ar
from twotower.text import encode_prompt, eos_token_ids

TASK_VERBS = ("Write", "Explain", "List", "Describe", "Give", "How", "What", "Summarize", "Compare", "Create")
SENTINEL = "\u2063USER\u2063"


def user_header(tokenizer) -> str:
    """The chat template's text up to where a user message starts (system prompt included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TwoTowerError("distill needs an instruct model with a chat template (the tokenizer has none)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    return text[: text.index(SENTINEL)]


def _complete_lines(path: Path) -> list[dict]:
    """Rows already written; a line cut by a kill is dropped from the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
    return [json.loads(line) for line in data[:cut].decode().splitlines() if line.strip()]


def distill(
    model,
    tokenizer,
    out: str | os.PathLike,
    rows: int,
    batch_size: int = 16,
    seed: int = 1,
    max_prompt_tokens: int = 48,
    max_answer_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.95,
    progress: bool = True,
    max_minutes: float = 0.0,
    shard_rows: int = 1024,
) -> dict:
    """Append rows to `out` until it holds `rows` rows (or max_minutes pass). Returns counts of
    what was kept and skipped, and the answer tokens per second of this call."""
    from tqdm.auto import tqdm

    if rows < 1 or batch_size < 1 or max_prompt_tokens < 1 or max_answer_tokens < 1:
        raise TwoTowerError("rows, batch_size, max_prompt_tokens and max_answer_tokens must be >= 1")
    shards = None
    path = Path(out)
    if path.suffix != ".jsonl":  # a folder: rows.jsonl and token shards
        path.mkdir(parents=True, exist_ok=True)
        shards = TokenShards(path, vocab_size=model.num_embeddings, shard_rows=shard_rows)
        path = path / SHARD_ROWS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _complete_lines(path)
    seen = {normalise(r["prompt"]) for r in done}
    state_file = path.with_name(path.name + ".state.json")
    state = json.loads(state_file.read_text()) if state_file.is_file() and done else {"batches": 0, "skipped": {}}
    heldout = heldout_prompts()
    header = user_header(tokenizer)
    eos = eos_token_ids(model, tokenizer)
    bar = tqdm(total=rows, initial=len(done), desc="distill", unit="row", disable=not progress)
    begin, new_tokens = time.perf_counter(), 0
    token_rows = [row_tokens(r, tokenizer) for r in done] if shards is not None else None
    while len(done) < rows and not (max_minutes > 0 and time.perf_counter() - begin > 60 * max_minutes):
        k = state["batches"]
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        verbs = [
            TASK_VERBS[int(i)] if bool(c) else None
            for i, c in zip(torch.randint(len(TASK_VERBS), (batch_size,), generator=g), torch.rand(batch_size, generator=g) < 0.5)
        ]
        starts = [tokenizer(header + (v or ""), add_special_tokens=False)["input_ids"] for v in verbs]
        asked = generate_ar(
            model,
            starts,
            max_new_tokens=max_prompt_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed * 1_000_003 + k,
            eos_token_id=eos,
        )
        prompts = []
        for verb, toks in zip(verbs, asked.tokens):
            text = ((verb or "") + tokenizer.decode(toks, skip_special_tokens=True)).strip()
            key = normalise(text)
            reason = "empty" if not key else "heldout" if key in heldout else "repeated" if key in seen else None
            if reason:
                state["skipped"][reason] = state["skipped"].get(reason, 0) + 1
                continue
            seen.add(key)
            prompts.append(text)
        complete = True  # a batch cut short by the row target is redone on resume (its rows are then repeats)
        if prompts:
            answers = generate_ar(
                model,
                [encode_prompt(tokenizer, p, chat=True) for p in prompts],
                max_new_tokens=max_answer_tokens,
                eos_token_id=eos,
            )
            with open(path, "a") as f:
                for prompt, toks in zip(prompts, answers.tokens):
                    if len(done) >= rows:
                        complete = False
                        break
                    row = {
                        "id": len(done) + 1,
                        "prompt": prompt,
                        "response": tokenizer.decode(toks, skip_special_tokens=True),
                        "response_tokens": len(toks),
                    }
                    f.write(json.dumps(row) + "\n")
                    done.append(row)
                    new_tokens += len(toks)
                    if token_rows is not None:
                        token_rows.append(row_tokens(row, tokenizer))
                    bar.update(1)
                f.flush()
                os.fsync(f.fileno())
        state["batches"] = k + 1 if complete else k
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file)
        if shards is not None and len(token_rows) // shard_rows > len(shards.index["shards"]):
            shards.write(token_rows)  # the shards completed so far
        seconds = time.perf_counter() - begin
        bar.set_postfix(tok_s=f"{new_tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    if shards is not None:
        shards.write(token_rows)
    seconds = time.perf_counter() - begin
    return {
        "rows": len(done),
        "complete": len(done) >= rows,
        "batches": state["batches"],
        "skipped": state["skipped"],
        "answer_tokens": new_tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1),
        "out": str(out),
    }
