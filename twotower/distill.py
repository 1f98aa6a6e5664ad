"""`twotower distill`: self-distilled training data from the backbone itself (Magpie-style).

For every row, the instruct model writes a user turn (sampled after its chat template's user
header, half the time after a task verb such as "Write"), then answers it greedily under the
chat template, exactly as AR mode would. The rows are what the denoiser should learn to
imitate: this backbone's own replies, a user's own fine-tune included.

Batched and seeded: batch k depends only on (seed, k, batch size), so a killed run resumed with
the same command writes the same file as an uninterrupted one. Output: JSONL, one object per line,
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
from dataclasses import dataclass
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


@dataclass
class Output:
    """Where distilled rows go and how far a run got: the JSONL file and its rows, the run state
    next to it ({"batches", "skipped", "recipe"}), and for a folder output its token shards."""

    path: Path
    rows: list[dict]
    state: dict
    shards: TokenShards | None = None
    token_rows: list[list[int]] | None = None  # every row's token ids (folder output only)

    @classmethod
    def open(cls, out: str | os.PathLike, model, tokenizer, shard_rows: int) -> Output:
        """The output of `out`, with what an earlier run of the same command wrote."""
        path, shards = Path(out), None
        if path.suffix != ".jsonl":  # a folder: rows.jsonl and token shards
            path.mkdir(parents=True, exist_ok=True)
            shards = TokenShards(path, vocab_size=model.num_embeddings, shard_rows=shard_rows)
            path = path / SHARD_ROWS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = _complete_lines(path)
        state_file = _state_file(path)
        state = json.loads(state_file.read_text()) if state_file.is_file() and rows else {"batches": 0, "skipped": {}}
        token_rows = [row_tokens(r, tokenizer) for r in rows] if shards is not None else None
        return cls(path, rows, state, shards, token_rows)

    def skip(self, reason: str) -> None:
        self.state["skipped"][reason] = self.state["skipped"].get(reason, 0) + 1

    def append(self, prompts: list[str], answers: list[list[int]], tokenizer, target: int) -> tuple[int, bool]:
        """Write (prompt, answer) rows until the file holds `target` rows, synced to disk.
        Returns (answer tokens written, whether every row was written)."""
        written, complete = 0, True
        with open(self.path, "a") as f:
            for prompt, toks in zip(prompts, answers):
                if len(self.rows) >= target:
                    complete = False
                    break
                row = {
                    "id": len(self.rows) + 1,
                    "prompt": prompt,
                    "response": tokenizer.decode(toks, skip_special_tokens=True),
                    "response_tokens": len(toks),
                }
                f.write(json.dumps(row) + "\n")
                self.rows.append(row)
                written += len(toks)
                if self.token_rows is not None:
                    self.token_rows.append(row_tokens(row, tokenizer))
            f.flush()
            os.fsync(f.fileno())
        return written, complete

    def commit(self, batches: int) -> None:
        """Record the batches done (atomically), and the token shards completed so far."""
        self.state["batches"] = batches
        state_file = _state_file(self.path)
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, state_file)
        if self.shards is not None and len(self.token_rows) // self.shards.index["shard_rows"] > len(self.shards.index["shards"]):
            self.shards.write(self.token_rows)

    def close(self) -> None:
        if self.shards is not None:
            self.shards.write(self.token_rows)


def _state_file(path: Path) -> Path:
    return path.with_name(path.name + ".state.json")


def ask_users(model, tokenizer, header: str, eos, batch: int, batch_size: int, seed: int, sampling: dict) -> list[str]:
    """Batch `batch`'s user turns: sampled after the chat template's user header, half of them
    after a task verb; a function of (seed, batch, batch_size) only. Row b of a call samples
    from the call's seed + b, so the call's seed is drawn at random (62 bits) from (seed,
    batch): no row shares another batch's or another seed's noise, as rows did when the seeds of
    consecutive batches were one apart (the next batch drew the same turns shifted by a row,
    and about half of them were dropped as repeats)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    picks, verb_used = torch.randint(len(TASK_VERBS), (batch_size,), generator=g), torch.rand(batch_size, generator=g) < 0.5
    verbs = [TASK_VERBS[int(i)] if bool(c) else "" for i, c in zip(picks, verb_used)]
    starts = [tokenizer(header + v, add_special_tokens=False)["input_ids"] for v in verbs]
    rows_seed = int(torch.randint(2**62, (1,), generator=g))
    asked = generate_ar(model, starts, seed=rows_seed, eos_token_id=eos, **sampling)
    return [(v + tokenizer.decode(toks, skip_special_tokens=True)).strip() for v, toks in zip(verbs, asked.tokens)]


def keep_new(texts: list[str], seen: set[str], heldout: set[str], output: Output) -> list[str]:
    """The user turns that are not empty, not a held-out evaluation prompt and not seen before
    (the others are counted in the output's state by reason)."""
    kept = []
    for text in texts:
        key = normalise(text)
        reason = "empty" if not key else "heldout" if key in heldout else "repeated" if key in seen else None
        if reason:
            output.skip(reason)
            continue
        seen.add(key)
        kept.append(text)
    return kept


def answer(model, tokenizer, prompts: list[str], max_answer_tokens: int, eos) -> list[list[int]]:
    """AR mode's greedy replies under the chat template."""
    if not prompts:
        return []
    chats = [encode_prompt(tokenizer, p, chat=True) for p in prompts]
    return generate_ar(model, chats, max_new_tokens=max_answer_tokens, eos_token_id=eos).tokens


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
    output = Output.open(out, model, tokenizer, shard_rows)
    recipe = dict(seed=seed, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                  max_answer_tokens=max_answer_tokens, temperature=temperature, top_p=top_p)  # fmt: skip
    changed = [
        f"{k} {output.state['recipe'][k]} -> {v}" for k, v in recipe.items() if output.state.get("recipe", recipe).get(k, v) != v
    ]
    if changed:  # its batches would sample other rows than the ones written: a file of two recipes
        raise TwoTowerError(
            f"{out} was made with other settings ({', '.join(changed)}): resume with the same ones, or give a new --out"
        )
    output.state["recipe"] = recipe
    seen, heldout = {normalise(r["prompt"]) for r in output.rows}, heldout_prompts()
    header, eos = user_header(tokenizer), eos_token_ids(model, tokenizer)
    sampling = dict(max_new_tokens=max_prompt_tokens, temperature=temperature, top_p=top_p)
    bar = tqdm(total=rows, initial=len(output.rows), desc="distill", unit="row", disable=not progress)
    begin, new_tokens = time.perf_counter(), 0
    while len(output.rows) < rows and not (max_minutes > 0 and time.perf_counter() - begin > 60 * max_minutes):
        batch, before = output.state["batches"], len(output.rows)
        texts = ask_users(model, tokenizer, header, eos, batch, batch_size, seed, sampling)
        prompts = keep_new(texts, seen, heldout, output)
        written, complete = output.append(prompts, answer(model, tokenizer, prompts, max_answer_tokens, eos), tokenizer, rows)
        output.commit(batch + 1 if complete else batch)  # a batch cut short by the row target is redone on resume
        new_tokens += written
        bar.update(len(output.rows) - before)
        bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - begin, 1e-9):.0f}")
    bar.close()
    output.close()
    seconds = time.perf_counter() - begin
    return {
        "rows": len(output.rows),
        "complete": len(output.rows) >= rows,
        "batches": output.state["batches"],
        "skipped": output.state["skipped"],
        "answer_tokens": new_tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1),
        "out": str(out),
    }
