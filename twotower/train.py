"""`twotower train`: adapt a pretrained backbone's denoiser with the one-pass objective.

Built on accelerate (devices, bf16 autocast, several GPUs with `accelerate launch`), AdamW
with a warmup-stable-decay schedule, gradient accumulation that gives the same update as one
big batch, clipping, periodic eval loss, a progress bar with loss and tokens/s, checkpoints
written atomically every N steps, exact resume after a kill, and a clear stop on a NaN loss.

Determinism: the sequences of step k and their noise depend only on (seed, k), and the
optimizer state is checkpointed, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from twotower.config import DENOISER_KINDS, LAYOUTS, TwoTowerError
from twotower.data import batch_indices, heldout_prompts, pack, read_rows
from twotower.features import build_features
from twotower.objective import Features, Noise, ar_first, layout_offset, masked_loss_sum, sample_noise


def option(default, help_text: str):
    """A config field whose help text becomes the `twotower train --help` line."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    data: str = option("", "training data: a .jsonl/.json/.parquet/.txt file or a datasets folder")
    model: str = option("default", "backbone (default, HF folder, .gguf) or a twotower checkpoint to go on from")
    out: str = option("runs/denoiser", "output folder: checkpoints, log.jsonl, final model")
    denoiser: str = option("lora", "lora or full")
    layout: str = option("shifted", "shifted or same-position")
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha")
    adaln: bool = option(True, "adaLN-single time conditioning")
    denoiser_depth: int | None = option(None, "denoiser layers K (None: all); a shallow one aligns with context layers")
    alignment: str = option("top", "context layers a shallow denoiser aligns with: top or spread")
    kl_weight: float = option(0.0, "weight of the distillation loss against the AR teacher's top-k distribution (0: off)")
    top_k: int = option(32, "tokens of the AR teacher's distribution kept for distillation")
    features: str = option("", "folder of cached frozen-tower features, built once and reused every epoch ('': none)")
    block_size: int = option(16, "block size S trained")
    blocks_per_sequence: int = option(8, "blocks per training sequence (L = blocks * S, + 1 in the shifted layout)")
    batch_size: int = option(8, "sequences per optimizer step (over all devices and micro-batches)")
    grad_accum: int = option(1, "micro-batches per step (batch_size must divide)")
    lr: float = option(2e-4, "peak learning rate")
    min_lr: float = option(1e-6, "learning rate at the end of the decay")
    warmup_steps: int = option(20, "linear warmup steps")
    decay_fraction: float = option(0.2, "share of max_steps spent decaying to min_lr (warmup-stable-decay)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(1.0, "gradient norm clip (0: none)")
    max_steps: int = option(200, "optimizer steps")
    eval_every: int = option(50, "eval loss every N steps (0: never)")
    eval_sequences: int = option(16, "packed sequences held out for the eval loss")
    save_every: int = option(50, "checkpoint every N steps")
    nfe_prompts: int = option(0, "at every eval, diffusion tokens per denoiser pass on this many held-out prompts (0: off)")
    nfe_threshold: float = option(0.8, "confidence threshold of that measurement")
    t_min: float = option(1e-3, "smallest masking level t")
    seed: int = option(0, "seed of data order, noise and initialisation")
    dtype: str = option("fp32", "backbone weights: fp32 or bf16 (LoRA, adaLN, mask embedding stay fp32)")
    mixed_precision: str = option("auto", "auto (bf16 on CUDA, none on CPU), bf16 or no")
    max_rows: int | None = option(None, "use at most this many data rows")
    fsdp: bool = option(False, "with several processes: FSDP (shard the trained weights) instead of DDP (replicate them)")
    max_minutes: float = option(0.0, "stop after this many minutes of training, with a checkpoint (0: no limit; rerun resumes)")

    def validate(self) -> None:
        checks = [
            (self.data != "", "data: give a training data file (--data)"),
            (self.denoiser in DENOISER_KINDS, f"denoiser must be one of {DENOISER_KINDS}, got {self.denoiser!r}"),
            (self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {self.layout!r}"),
            (self.block_size >= 1 and self.blocks_per_sequence >= 1, "block_size and blocks_per_sequence must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (
                self.batch_size % self.grad_accum == 0,
                f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}",
            ),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (0 <= self.decay_fraction <= 1, "decay_fraction must be in [0, 1]"),
            (self.max_steps >= 1 and self.save_every >= 1, "max_steps and save_every must be >= 1"),
            (0 < self.t_min <= 1, "t_min must be in (0, 1]"),
            (self.dtype in ("fp32", "bf16"), f"dtype must be fp32 or bf16, got {self.dtype!r}"),
            (self.mixed_precision in ("auto", "bf16", "no"), "mixed_precision must be auto, bf16 or no"),
            (self.kl_weight >= 0 and self.top_k >= 1, "kl_weight must be >= 0 and top_k >= 1"),
            (
                not self.fsdp or torch.cuda.is_available(),
                "fsdp needs GPUs (accelerate's FSDP has no CPU backend); without it, several CPU processes use DDP",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TwoTowerError(message)

    @property
    def seq_len(self) -> int:
        return self.blocks_per_sequence * self.block_size + layout_offset(self.layout)


def load_config(path: str | None, overrides: dict) -> TrainConfig:
    """A YAML preset (optional) with flags on top; unknown keys are refused."""
    values = {}
    if path:
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TwoTowerError(f"could not read config {path}: {err}") from err
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TwoTowerError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    config = TrainConfig(**values)
    config.validate()
    return config


def learning_rate(config: TrainConfig, step: int) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay to min_lr over the last
    `decay_fraction` of the steps. `step` is 0-based."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = int(config.max_steps * config.decay_fraction)
    decay_start = config.max_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return config.lr
    frac = (step - decay_start + 1) / decay_steps
    return config.lr + (config.min_lr - config.lr) * min(frac, 1.0)


class Objective(nn.Module):
    """The model behind a forward that returns (masked loss sum, masked count), so that
    accelerate can wrap it (DDP) and run it under autocast. features: the cached frozen-tower
    features of the batch, or None (the frozen tower runs in the step)."""

    def __init__(self, model, kl_weight: float = 0.0, top_k: int = 32):
        super().__init__()
        self.model, self.kl_weight, self.top_k = model, kl_weight, top_k

    def forward(self, ids: torch.Tensor, t: torch.Tensor, masked: torch.Tensor, features: Features | None = None):
        loss, count = masked_loss_sum(self.model, ids, Noise(t, masked), features, self.kl_weight, self.top_k)
        return loss, torch.tensor(count, device=ids.device)


def step_noise(config: TrainConfig, step: int, batch: int) -> Noise:
    """The noise of step `step`: a function of (seed, step) only. The first target of every
    block stays visible (`ar_first`): at generation time it is the context tower's own token."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1)
    return ar_first(sample_noise(batch, config.blocks_per_sequence, config.block_size, gen, config.t_min))


def trainable_parameters(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------ checkpoints (safetensors + JSON)
def save_checkpoint(folder: Path, model, optimizer, state: dict) -> None:
    """Write model, optimizer and run state to folder/step-N, atomically (temp folder, rename),
    then point folder/latest at it and remove older checkpoints."""
    final = folder / f"step-{state['step']}"
    tmp = folder / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    opt = optimizer.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().contiguous().cpu() for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)
    }
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"]}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = folder / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, folder / "latest")
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    found = folder / pointer.read_text().strip()
    if not (found / "state.json").is_file():
        raise TwoTowerError(f"{pointer} names {found}, which is not a complete checkpoint: remove {pointer} to start over")
    return found


def read_run_state(found: Path) -> dict:
    """The run state of a checkpoint (step, losses, config, optimizer param groups)."""
    try:
        return json.loads((found / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise TwoTowerError(f"checkpoint {found} is corrupt: {err}") from err


def load_checkpoint(found: Path, model, optimizer, state: dict) -> dict:
    """Load the trained tensors and the optimizer of a checkpoint whose run state is `state`."""
    try:
        tensors = load_file(str(found / "optimizer.safetensors"))
    except (OSError, ValueError) as err:
        raise TwoTowerError(f"checkpoint {found} is corrupt: {err}") from err
    model.load_trained_state(found / "denoiser.safetensors")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


def _truncate_log(log: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they are done again)."""
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in lines))


# ------------------------------------------------------------------ the loop
def build_model(config: TrainConfig):
    """A backbone wrapped as a new two-tower model with the config's denoiser settings, or a
    twotower checkpoint to go on from (load_model tells them apart; a checkpoint keeps its own).
    With a bf16 backbone the small trained tensors (LoRA, adaLN, the mask embedding) are kept in
    fp32, so that AdamW's updates are not rounded away."""
    from twotower.model.checkpoint import load_model

    dtype = torch.float32 if config.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(config.seed)  # LoRA A matrices
    model, tokenizer = load_model(
        config.model,
        dtype=dtype,
        shipped=False,
        denoiser=config.denoiser,
        layout=config.layout,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        adaln=config.adaln,
        block_size=config.block_size,
        denoiser_depth=config.denoiser_depth,
        alignment=config.alignment,
    )
    for module in (model.lora, model.time_conditioning):
        if module is not None:
            module.float()
    model.mask_embedding.data = model.mask_embedding.data.float()
    return model, tokenizer


def train(config: TrainConfig, model=None, tokenizer=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a training run. `model`/`tokenizer` may be given (tests); otherwise
    they are loaded from `config.model`. `stop_after` ends the call after that many steps
    of this call (as a kill would). Returns the run state: step, losses, eval losses."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = build_model(config)
    if model.config.block_size != config.block_size or model.config.layout != config.layout:
        raise TwoTowerError(
            f"the model is a {model.config.layout} S={model.config.block_size} two-tower model but the config asks "
            f"for {config.layout} S={config.block_size}"
        )
    rows = read_rows(config.data, config.max_rows)
    packed = pack(rows, tokenizer, config.seq_len, heldout_prompts())
    train_seqs, eval_seqs = packed.split(config.eval_sequences)
    store = None
    if config.features:  # the frozen tower runs once per sequence, here, instead of in every step
        store = build_features(model, packed.sequences, config.features, config.block_size, config.top_k, progress=progress)

    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    plugin = None
    if config.fsdp:  # shard the trained weights over the processes instead of replicating them (validate: GPUs only)
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(use_orig_params=True, sync_module_states=True)
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % (world * config.grad_accum):
        raise TwoTowerError(
            f"batch_size {config.batch_size} is not a multiple of devices x grad_accum = {world * config.grad_accum}"
        )
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    state = {
        "step": 0,
        "losses": [],
        "eval_losses": [],
        "training_tokens": 0,
        "seconds": 0.0,
        "config": dataclasses.asdict(config),
        "refused_heldout_rows": packed.refused,
    }
    found = latest_checkpoint(out)
    if found is not None:
        saved = read_run_state(found)
        changed = {
            k
            for k in ("data", "seed", "batch_size", "block_size", "blocks_per_sequence", "layout", "denoiser")
            if saved.get("config", {}).get(k) != getattr(config, k)
        }
        if changed:
            raise TwoTowerError(
                f"{out} holds a run with different {sorted(changed)}: resume with the same settings or choose another --out"
            )
        state = load_checkpoint(found, model, optimizer, saved)
        _truncate_log(out / "log.jsonl", state["step"])
    model.to(accelerator.device)
    objective, optimizer = accelerator.prepare(Objective(model, config.kl_weight, config.top_k), optimizer)
    per_device = config.batch_size // world
    micro = per_device // config.grad_accum
    first = state["step"]
    last = config.max_steps if stop_after is None else min(config.max_steps, first + stop_after)
    bar = tqdm(total=config.max_steps, initial=first, desc="train", disable=not (progress and accelerator.is_main_process))
    deadline = time.monotonic() + 60 * config.max_minutes if config.max_minutes > 0 else None
    while state["step"] < last:
        step, begin = state["step"], time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        indices = batch_indices(len(train_seqs), config.batch_size, step, config.seed)
        noise = step_noise(config, step, config.batch_size)
        mine = slice(rank * per_device, (rank + 1) * per_device)
        indices, noise = indices[mine], Noise(noise.t[mine], noise.masked[mine])
        total_loss = torch.zeros((), device=accelerator.device)
        total_count = torch.zeros((), device=accelerator.device, dtype=torch.long)
        chunks = list(zip(indices.split(micro), noise.split(micro)))
        for i, (chunk, chunk_noise) in enumerate(chunks):
            sync = i == len(chunks) - 1
            ids, features = _read(train_seqs, store, chunk, model, accelerator.device)
            with accelerator.no_sync(objective) if not sync else contextlib.nullcontext(), accelerator.autocast():
                loss, count = objective(
                    ids, chunk_noise.t.to(accelerator.device), chunk_noise.masked.to(accelerator.device), features
                )
            accelerator.backward(loss)
            total_loss += loss.detach()
            total_count += count
        total_loss = accelerator.reduce(total_loss, "sum")
        total_count = accelerator.reduce(total_count, "sum")
        value = (total_loss / total_count.clamp(min=1)).item()
        if not math.isfinite(value):
            raise TwoTowerError(
                f"the loss is {value} at step {step + 1}: stopped without saving this step "
                f"(last checkpoint: {latest_checkpoint(out)}); lower --lr or check the data"
            )
        scale = world / max(int(total_count), 1)  # DDP averages over devices: undo, divide by all masked targets
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = float(accelerator.clip_grad_norm_(params, config.clip if config.clip > 0 else float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["losses"].append(value)
        state["training_tokens"] += config.batch_size * config.seq_len
        state["masked_tokens"] = state.get("masked_tokens", 0) + int(total_count)
        state["seconds"] += time.perf_counter() - begin
        record = {
            "step": step + 1,
            "loss": value,
            "grad_norm": grad_norm,
            "lr": learning_rate(config, step),
            "training_tokens": state["training_tokens"],
            "masked_tokens": state["masked_tokens"],
            "seconds": round(state["seconds"], 3),
        }
        if config.eval_every and (step + 1) % config.eval_every == 0:
            state["eval_losses"].append([step + 1, eval_loss(objective, eval_seqs, config, accelerator, store, model)])
            record["eval_loss"] = state["eval_losses"][-1][1]
            if config.nfe_prompts and tokenizer is not None:
                record["tokens_per_nfe"] = tokens_per_nfe(model, tokenizer, config)
                state.setdefault("nfe_curve", []).append([state["training_tokens"], record["tokens_per_nfe"]])
        out_of_time = deadline is not None and _agree(accelerator, time.monotonic() > deadline)
        if accelerator.is_main_process:
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", masked_tok_s=f"{state['masked_tokens'] / max(state['seconds'], 1e-9):.0f}")
            model.config.trained_tokens = state["training_tokens"]
            if (step + 1) % config.save_every == 0 or step + 1 == config.max_steps or out_of_time:
                save_checkpoint(out, model, optimizer, state)
        if out_of_time:
            break
    bar.close()
    if state["step"] == config.max_steps and accelerator.is_main_process:
        model.save_pretrained(out / "final")
    return {**state, "main_process": accelerator.is_main_process}


def _agree(accelerator, flag: bool) -> bool:
    """The same decision on every process (the main one's clock decides)."""
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, "max").item() > 0) if accelerator.num_processes > 1 else flag


def _read(sequences: torch.Tensor, store, indices: torch.Tensor, model, device, offset: int = 0):
    """The ids of the sequences at `indices` and their cached features (None without a store;
    the store holds every packed sequence, these from `offset` on)."""
    if store is None:
        return sequences[indices].to(device), None
    ids, features = store.batch((indices + offset).tolist(), model)
    return ids.to(device), features


def tokens_per_nfe(model, tokenizer, config: TrainConfig, max_new_tokens: int = 64) -> float:
    """Diffusion-mode tokens per denoiser pass on the first held-out evaluation prompts (greedy)."""
    from twotower.eval.tasks import builtin_tasks, interleave_categories
    from twotower.generate import generate_mask_diffusion
    from twotower.text import encode_prompt, eos_token_ids

    tasks = interleave_categories(builtin_tasks())[: config.nfe_prompts]
    prompts = [encode_prompt(tokenizer, t.prompt, chat=True) for t in tasks]
    result = generate_mask_diffusion(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        threshold=config.nfe_threshold,
        eos_token_id=eos_token_ids(model, tokenizer),
    )
    return round(result.tokens_per_nfe, 4)


@torch.no_grad()
def eval_loss(objective, sequences: torch.Tensor, config: TrainConfig, accelerator, store=None, model=None) -> float:
    """The training loss per masked target on the held-out sequences (the last ones of the
    packed data, so their cached features follow the training ones), with fixed noise."""
    gen = torch.Generator().manual_seed(config.seed + 7)
    noise = ar_first(sample_noise(len(sequences), config.blocks_per_sequence, config.block_size, gen, config.t_min))
    total, count = 0.0, 0
    size = max(config.batch_size // config.grad_accum, 1)
    offset = 0 if store is None else len(store) - len(sequences)
    for chunk, chunk_noise in zip(torch.arange(len(sequences)).split(size), noise.split(size)):
        ids, features = _read(sequences, store, chunk, model, accelerator.device, offset)
        with accelerator.autocast():
            loss, n = objective(ids, chunk_noise.t.to(accelerator.device), chunk_noise.masked.to(accelerator.device), features)
        total, count = total + float(loss), count + int(n)
    return total / max(count, 1)
