"""The draft vocabulary: the tokens of a denoiser's training data, most frequent first, with
their counts, stored next to its checkpoint (`draft_vocab.safetensors`). Verify mode's denoiser
drafts may pick among the N most frequent only (`VerifyOptions.draft_vocab`): the LM head then
multiplies N of its rows instead of the whole vocabulary's (`denoiser.DraftHead`). Drafts only
propose and the context tower decides, so the output stays AR's; a token outside the N is
never drafted. Its coverage (the share of the training data's tokens among the N) says how
often that can cost an accepted draft.

`twotower draft-vocab CHECKPOINT DATA` writes the file for a checkpoint and its training data,
and a line with the coverage into the checkpoint's MODEL_CARD.md where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from twotower.config import TwoTowerError

FILE_NAME = "draft_vocab.safetensors"
CARD_SIZES = (1024, 2048, 4096, 8192)  # the sizes whose coverage the model card states
CARD_MARK = "<!-- draft-vocab: written by `twotower draft-vocab` -->"


@dataclass
class DraftVocab:
    """Every token of the training data, most frequent first."""

    ids: torch.Tensor  # (M,) long
    counts: torch.Tensor  # (M,) long, descending
    total: int  # tokens counted

    def top(self, size: int) -> torch.Tensor:
        """The `size` most frequent ids (all M when size >= M), (N,) long."""
        return self.ids[:size]

    def coverage(self, size: int) -> float:
        """The share of the counted tokens among the `size` most frequent."""
        return float(self.counts[:size].sum()) / max(self.total, 1)


def count_tokens(token_lists, vocab_size: int) -> DraftVocab:
    """The draft vocabulary of token id lists (every id in [0, vocab_size))."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_lists:
        counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=vocab_size)
    order = counts.argsort(descending=True, stable=True)
    seen = order[counts[order] > 0]
    return DraftVocab(seen, counts[seen], int(counts.sum()))


def save(folder: str | Path, vocab: DraftVocab) -> Path:
    path = Path(folder) / FILE_NAME
    save_file({"ids": vocab.ids.contiguous(), "counts": vocab.counts.contiguous()}, str(path),
              metadata={"total": str(vocab.total)})  # fmt: skip
    return path


def load(folder: str | Path) -> DraftVocab | None:
    """The draft vocabulary stored in a checkpoint folder, or None where it has none."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in ("ids", "counts")}
            total = int(f.metadata()["total"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise TwoTowerError(f"{path} is corrupt or not a draft vocabulary: {err}") from err
    return DraftVocab(tensors["ids"].long(), tensors["counts"].long(), total)


def card_line(vocab: DraftVocab, sizes=CARD_SIZES) -> str:
    """One Markdown line: the coverage of the draft vocabulary at a few sizes."""
    shares = ", ".join(f"{n}: {100 * vocab.coverage(n):.1f}%" for n in sizes)
    return (
        f"Draft vocabulary (`{FILE_NAME}`, `--draft-vocab N`): the share of the training data's "
        f"{vocab.total:,} tokens ({len(vocab.ids):,} distinct) among its N most frequent: {shares}."
    )


def write_card_line(folder: str | Path, vocab: DraftVocab) -> bool:
    """Put `card_line` into the folder's MODEL_CARD.md (replacing the one written before);
    False where there is no model card."""
    card = Path(folder) / "MODEL_CARD.md"
    if not card.is_file():
        return False
    lines = card.read_text().splitlines()
    line = f"{CARD_MARK}\n{card_line(vocab)}"
    if CARD_MARK in lines:
        at = lines.index(CARD_MARK)
        lines[at : at + 2] = [line]
    else:
        lines += ["", line]
    card.write_text("\n".join(lines) + "\n")
    return True
