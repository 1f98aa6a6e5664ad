"""Cached frozen-tower features: training that costs only the denoiser.

The frozen context tower runs once per training sequence. What the denoiser reads of it is
written to disk and reused every epoch, so a training step runs the denoiser alone:

- per aligned attention layer, K and V at every position (N, Hkv, n*S, D);
- per aligned Mamba-2 layer, the conv and SSM state at every block boundary (N, n, ...);
- a shallow denoiser's anchors: the hidden state entering its first aligned layer at every
  block's anchor token (N, n, H), and with `fuse_layers` those entering the fused layers after
  it (N, n, k*H);
- the AR teacher: its top-k next-token ids and log-probabilities at every position (N, n*S, k);
- the token ids themselves (N, n*S + offset).

A folder holds `shard-00000.safetensors`, ... (at most `shard_size` sequences each, read
memory-mapped) and `index.json`, which names the settings the features were made for (backbone
fingerprint, aligned layers, block layout, top-k, dtype, a hash of the sequences): a store made
for other settings is refused, naming what differs, not silently reused; `--features auto` picks
a folder keyed by all of that, so each dataset and setting gets its own. Building is resumable: each shard is written
to a temporary file and renamed, and a rerun continues after the last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twotower.backbones.base import AttentionState
from twotower.backbones.ssm import MambaState
from twotower.cache import cache_dir, lock_beside
from twotower.config import TwoTowerError
from twotower.data import data_paths
from twotower.model.cache import ContextView
from twotower.objective import Features, Teacher, context_features

INDEX = "index.json"
AUTO_FEATURES = "auto"  # `--features auto`: the folder is keyed by the data and the settings (keyed_folder)


def _settings(model, sequences: torch.Tensor, block_size: int, top_k: int) -> dict:
    digest = hashlib.sha256(sequences.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {
        "backbone_fingerprint": model.config.backbone_fingerprint,
        "aligned_layers": list(model.denoiser.aligned),
        "shallow": model.denoiser.shallow,
        "layout": model.config.layout,
        "block_size": block_size,
        "blocks_per_sequence": (sequences.shape[1] - model.layout.offset) // block_size,
        "sequence_length": sequences.shape[1],
        "sequences": sequences.shape[0],
        "sequences_sha256": digest,
        "top_k": top_k,
        "dtype": str(model.dtype).removeprefix("torch."),
        **({"fuse_layers": model.denoiser.fuse} if model.denoiser.fuse else {}),  # wider anchors
    }


def keyed_folder(model, sequences: torch.Tensor, block_size: int, top_k: int, data: str) -> Path:
    """`--features auto`: $TWOTOWER_CACHE/features/DATA-KEY, KEY a hash of everything that shapes
    the features (the packed sequences, the backbone's fingerprint, the layers kept, the block
    layout, top-k, dtype), so that other data or settings never land in the same folder."""
    settings = json.dumps(_settings(model, sequences, block_size, top_k), sort_keys=True)
    key = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return cache_dir() / "features" / f"{Path(data_paths(data)[0]).stem or 'data'}-{key}"


def refuse_other_features(folder: Path, stored: dict, settings: dict) -> None:
    """One TwoTowerError naming --features and each setting that differs, stored -> wanted."""
    changed = [f"{k} {stored.get(k)} -> {settings[k]}" for k in settings if stored.get(k) != settings[k]]
    if changed:
        other = " (other data)" if stored.get("sequences_sha256") != settings["sequences_sha256"] else ""
        raise TwoTowerError(
            f"--features {folder} holds features made for other data or settings{other}: {', '.join(changed)}; give "
            f"another --features folder, --features {AUTO_FEATURES} (a folder per data and settings), or remove this one"
        )


def _tensors(model, ids: torch.Tensor, features: Features) -> dict[str, torch.Tensor]:
    """The named tensors of one chunk of sequences (batch first)."""
    batch = ids.shape[0]
    out = {"ids": ids.to(torch.int32)}
    for a in model.denoiser.aligned:
        state = features.view.states[a]
        if isinstance(state, AttentionState):
            out[f"L{a}.k"], out[f"L{a}.v"] = state.k, state.v
        elif isinstance(state, MambaState):  # states at every block boundary, folded (B*n): unfold
            out[f"L{a}.conv"] = state.conv.reshape(batch, -1, *state.conv.shape[1:])
            out[f"L{a}.ssm"] = state.ssm.reshape(batch, -1, *state.ssm.shape[1:])
    if features.anchors is not None:
        out["anchors"] = features.anchors
    if features.teacher is not None:
        out["teacher.ids"] = features.teacher.ids.to(torch.int32)
        out["teacher.logp"] = features.teacher.logp.float()
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e3:.1f} KB"


@torch.no_grad()
def check_disk_space(model, sequences, folder: Path, n_blocks: int, block_size: int, top_k: int, done: int) -> int:
    """Say how large the features will be (measured on one sequence) and refuse, before any
    work, where the disk lacks the room for what is left to write. Returns that size in bytes."""
    ids = sequences[:1].to(model.context_device)
    one = _tensors(model, ids, context_features(model, ids, n_blocks, block_size, top_k))
    per_sequence = sum(t.numel() * t.element_size() for t in one.values())
    needed, free = per_sequence * (len(sequences) - done), shutil.disk_usage(folder).free
    print(
        f"features: {len(sequences)} sequences x {_size(per_sequence)} = about {_size(per_sequence * len(sequences))} "
        f"in {folder}" + (f" ({_size(needed)} left to write)" if done else ""),
        file=sys.stderr,
        flush=True,
    )
    if needed > free:
        raise TwoTowerError(
            f"the features need about {_size(needed)} more in {folder}, which has {_size(free)} free: free some space, "
            "give --features a folder on a larger disk, or train without cached features (--features '')"
        )
    return needed


@torch.no_grad()
def build_features(
    model,
    sequences: torch.Tensor,
    folder: str | os.PathLike,
    block_size: int,
    top_k: int = 32,
    batch_size: int = 16,
    shard_size: int = 256,
    progress: bool = True,
) -> FeatureStore:
    """Run the frozen tower once over every sequence (N, n*S + offset) and write what the
    denoiser reads to `folder`; resumes a build cut short. Returns the store."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # One builder at a time per folder: a second run started meanwhile (a sweep of variants on
    # one data set) waits, then finds the shards written and goes on from them.
    with lock_beside(folder):
        return _build(model, sequences, folder, block_size, top_k, batch_size, shard_size, progress)


def _build(model, sequences, folder: Path, block_size: int, top_k: int, batch_size: int, shard_size: int, progress: bool):
    from tqdm.auto import tqdm

    settings = _settings(model, sequences, block_size, top_k)
    index_file = folder / INDEX
    index = {"settings": settings, "shard_size": shard_size, "shards": []}
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        refuse_other_features(folder, index.get("settings", {}), settings)
        shard_size = index["shard_size"]
    n_blocks = settings["blocks_per_sequence"]
    done = len(index["shards"]) * shard_size
    if done < len(sequences):
        check_disk_space(model, sequences, folder, n_blocks, block_size, top_k, done)
    bar = tqdm(total=len(sequences), initial=min(done, len(sequences)), desc="features", unit="seq", disable=not progress)
    device = model.context_device
    for start in range(done, len(sequences), shard_size):
        chunks = []
        for lo in range(start, min(start + shard_size, len(sequences)), batch_size):
            ids = sequences[lo : min(lo + batch_size, start + shard_size, len(sequences))].to(device)
            chunks.append(_tensors(model, ids, context_features(model, ids, n_blocks, block_size, top_k)))
            bar.update(len(ids))
        shard = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        name = f"shard-{len(index['shards']):05d}.safetensors"
        tmp = folder / f".tmp-{name}"
        save_file(shard, str(tmp))
        os.replace(tmp, folder / name)
        index["shards"].append({"file": name, "sequences": len(shard["ids"])})
        tmp_index = folder / f".tmp-{INDEX}"
        tmp_index.write_text(json.dumps(index, indent=1))
        os.replace(tmp_index, index_file)
    bar.close()
    return FeatureStore(folder)


@dataclass
class FeatureStore:
    """Read access to a features folder: `batch(indices)` gives the ids and the `Features` of
    those sequences (tensors read from memory-mapped shards)."""

    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as err:
            raise TwoTowerError(f"{self.folder} is not a features folder (no readable {INDEX}): {err}") from err
        self.settings = self.index["settings"]
        self.shard_size = self.index["shard_size"]
        self._open = {}

    def __len__(self) -> int:
        return sum(s["sequences"] for s in self.index["shards"])

    @property
    def complete(self) -> bool:
        return len(self) == self.settings["sequences"]

    def _shard(self, i: int):
        if i not in self._open:
            path = self.folder / self.index["shards"][i]["file"]
            try:
                self._open[i] = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises several kinds on a damaged file
                raise TwoTowerError(f"{path} is corrupt: {err}; remove it and its index entry to rebuild") from err
        return self._open[i]

    def _rows(self, name: str, indices: list[int]) -> torch.Tensor:
        parts = []
        for i in indices:
            shard, row = divmod(i, self.shard_size)
            parts.append(self._shard(shard).get_slice(name)[row : row + 1])
        return torch.cat(parts)

    def batch(self, indices, model) -> tuple[torch.Tensor, Features]:
        """(ids (B, L) long, Features) of the sequences at `indices`, on the model's device."""
        indices = [int(i) for i in indices]
        device = model.context_device
        if any(i < 0 or i >= len(self) for i in indices):
            raise TwoTowerError(f"feature index out of range (the store holds {len(self)} sequences)")
        names = set(self._shard(0).keys())
        ids = self._rows("ids", indices).long().to(device)
        states = [None] * len(model.context_tower.model.layers)
        for a in model.denoiser.aligned:
            if f"L{a}.k" in names:
                states[a] = AttentionState(self._rows(f"L{a}.k", indices).to(device), self._rows(f"L{a}.v", indices).to(device))
            elif f"L{a}.conv" in names:
                conv, ssm = self._rows(f"L{a}.conv", indices), self._rows(f"L{a}.ssm", indices)
                states[a] = MambaState(conv.flatten(0, 1).to(device), ssm.flatten(0, 1).to(device))
        length = self.settings["blocks_per_sequence"] * self.settings["block_size"]
        view = ContextView(states, torch.ones(len(indices), length, dtype=torch.bool, device=device))
        anchors = self._rows("anchors", indices).to(device) if "anchors" in names else None
        teacher = None
        if "teacher.ids" in names:
            teacher = Teacher(
                self._rows("teacher.ids", indices).long().to(device), self._rows("teacher.logp", indices).to(device)
            )
        return ids, Features(view, anchors, teacher)
