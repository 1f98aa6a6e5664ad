"""Checkpoints: a folder of config.json and denoiser.safetensors, the trained tensors only (the
denoiser's `trained_state_dict`), and where there is one the draft vocabulary
(`draft_vocab.safetensors`, `twotower.model.draft_vocab`); the backbone is referenced by
`config.backbone_ref` and checked by fingerprint. And `load_model`, which loads what a user
names: a checkpoint, "default" with the denoiser that ships for it (`shipped_denoiser`), or a
backbone wrapped as an untrained model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from twotower.backbones import backbone_fingerprint, load_backbone, read_config, resolve_backbone_path
from twotower.config import TwoTowerConfig, TwoTowerError
from twotower.model import draft_vocab

WEIGHTS_NAME = "denoiser.safetensors"
SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "smollm2-135m-instruct"


def save(model, path: str | os.PathLike) -> None:
    """Write config.json and denoiser.safetensors (atomically: temp file, then rename)."""
    if model.weights != "dense" or model.denoiser.merged or model.fused:
        how = ("its LoRA adapters merged" if model.denoiser.merged else
               f"its weights quantised to {model.weights}" if model.weights != "dense" else "its projections fused")  # fmt: skip
        raise TwoTowerError(f"this model is prepared for inference ({how}); save the model as loaded")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        metadata = {"format": "pt", "denoiser": model.config.denoiser}
        save_file(model.denoiser.trained_state_dict(), tmp, metadata=metadata)
        os.replace(tmp, path / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if model.draft_vocab is not None:
        draft_vocab.save(path, model.draft_vocab)


def from_pretrained(cls, path: str | os.PathLike, backbone=None, dtype=None, config=None, **kwargs):
    """Load a checkpoint written by `save` as a `cls` (TwoTowerForCausalLM).

    backbone: a loaded backbone module, or a reference overriding the one in config.json.
    dtype: torch dtype of the backbone (default bfloat16; `torch_dtype` is accepted too).
    """
    path = Path(path)
    dtype = dtype or kwargs.get("torch_dtype") or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not (path / "config.json").is_file() or not (path / WEIGHTS_NAME).is_file():
        raise TwoTowerError(f"{path} is not a twotower checkpoint (needs config.json and {WEIGHTS_NAME})")
    if config is None:
        read_config(path / "config.json")  # a truncated or corrupt file: one line that names it
        try:
            config = TwoTowerConfig.from_pretrained(path)
        except (OSError, ValueError, TypeError) as err:
            raise TwoTowerError(f"{path / 'config.json'} is not a usable twotower config: {str(err).splitlines()[0]}") from err
    if getattr(config, "model_type", None) != "twotower":
        raise TwoTowerError(f"{path}/config.json is not a twotower config")
    tokenizer, given, which = None, None, "the backbone given (a loaded module)"
    if backbone is None:
        backbone, tokenizer = load_backbone(stored_backbone(path, config), dtype)
        which = "the backbone found there"
    elif isinstance(backbone, (str, os.PathLike)):
        given = resolve_backbone_ref(backbone)
        backbone, tokenizer = load_backbone(given, dtype)
        which = f"the backbone given, {given!r},"
    found = backbone_fingerprint(backbone)
    if config.backbone_fingerprint and found != config.backbone_fingerprint:
        raise TwoTowerError(
            f"checkpoint {path} was trained on backbone {config.backbone_ref!r} (fingerprint "
            f"{config.backbone_fingerprint}), but {which} has fingerprint {found}: "
            "pass --backbone PATH naming the backbone it was trained on"
        )
    if given is not None:  # where the backbone lies now: a checkpoint trained further from this one records it
        config.backbone_ref = given
    model = cls(config, backbone, tokenizer)
    model.tokenizer = tokenizer
    load_trained_state(model, path / WEIGHTS_NAME)
    model.draft_vocab = load_draft_vocab(path, model.num_embeddings)
    return model


def load_draft_vocab(path: Path, num_embeddings: int):
    """The checkpoint's draft vocabulary (None: it has none), its ids checked against the backbone."""
    vocab = draft_vocab.load(path)
    if vocab is not None and len(vocab.ids) and int(vocab.ids.max()) >= num_embeddings:
        raise TwoTowerError(
            f"{path / draft_vocab.FILE_NAME} holds token ids outside the backbone's vocabulary [0, {num_embeddings})"
        )
    return vocab


def resolve_backbone_ref(ref: str | os.PathLike) -> str:
    """A backbone reference as a checkpoint records it: "default", or an absolute path."""
    return "default" if str(ref) == "default" else str(resolve_backbone_path(ref))


def stored_backbone(path: Path, config: TwoTowerConfig) -> str:
    """The backbone a checkpoint's config names, or one TwoTowerError saying how to repoint it
    when it is not here (the checkpoint was moved to another machine, or the backbone was)."""
    ref = config.backbone_ref
    if ref != "default" and not Path(ref).expanduser().exists():
        raise TwoTowerError(
            f"checkpoint {path} was trained on backbone {ref!r}, which is not found: pass --backbone PATH naming "
            "that backbone where it lies now (its folder or .gguf file; checked against the checkpoint's fingerprint)"
        )
    return ref


def load_trained_state(model, file: Path) -> None:
    """Load a denoiser.safetensors into the model's denoiser (`set_trained_state`)."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise TwoTowerError(f"{file} is corrupt or not a safetensors file: {err}") from err
    set_trained_state(model, state, file)


def set_trained_state(model, state: dict[str, torch.Tensor], file: Path) -> None:
    """Put the tensors read from `file` into the model's denoiser: every tensor it trains, no
    other, each of the shape the model expects."""
    expected = model.denoiser.trained_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TwoTowerError(
            f"{file} does not match this model ({model.config.denoiser} denoiser): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise TwoTowerError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    model.denoiser.load_state_dict(state, strict=False)  # strict=False: a tied tensor is stored once


def shipped_denoiser() -> Path | None:
    """The trained denoiser that ships for the default backbone (twotower/checkpoints/), or None."""
    return SHIPPED if (SHIPPED / WEIGHTS_NAME).is_file() else None
