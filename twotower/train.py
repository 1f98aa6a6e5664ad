"""`twotower train`: adapt a pretrained backbone's denoiser with the one-pass objective.

Built on accelerate (devices, bf16 autocast, several GPUs with `accelerate launch`), AdamW
with a warmup-stable-decay schedule, gradient accumulation that gives the same update as one
big batch, clipping, periodic eval loss, a progress bar with loss and tokens/s, checkpoints
written atomically every N steps (the newest two kept: one that does not load is named and the
one before it used), exact resume after a kill, and a clear stop on a NaN loss.

Determinism: the sequences of step k and their noise depend only on (seed, k), and the
optimizer state is checkpointed, so a resumed run repeats the uninterrupted one.

A run folder has one truth, its latest checkpoint: the same command resumes from it ("resuming
from step N of M"); other settings are refused before any work, naming each (the settings free
to change are listed once, MAY_CHANGE_ON_RESUME); final/ is a copy of the last checkpoint's
model, so a finished run rerun leaves it as it is and says so; Ctrl-C or SIGTERM finishes the
step in progress, saves it and stops with one line (a second one stops at once, keeping the
last step done where that is safe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from twotower.config import TwoTowerError
from twotower.data import batch_indices, heldout_prompts, pack, read_sources
from twotower.features import AUTO_FEATURES, FeatureStore, build_features, keyed_folder
from twotower.model import draft_vocab
from twotower.objective import Features, Noise, ar_first, masked_loss_sum, sample_noise
from twotower.settings import TrainConfig


def load_config(path: str | None, overrides: dict) -> TrainConfig:
    """A YAML preset (optional) with the flags given on top (`overrides`: only those given, so
    that `--denoiser-depth None` can undo a preset's value); unknown keys are refused."""
    values = {}
    if path:
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TwoTowerError(f"could not read config {path}: {err}") from err
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TwoTowerError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    config = TrainConfig(**values)
    config.validate()
    return config


def learning_rate(config: TrainConfig, step: int, extensions: list[dict] = ()) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay to min_lr over the last
    `decay_fraction` of the steps. `step` is 0-based. `extensions`: the run's state["extensions"]
    (`--extend`, oldest first); from the step of each that holds a learning rate ("lr"), that
    rate is held, then decays to min_lr over the last decay_fraction of the steps from there."""
    held = [e for e in extensions if e["lr"] is not None]
    ends = [e["max_steps"] for e in held] + [config.max_steps]  # where each part of the schedule ends
    part = sum(e["step"] <= step for e in held)
    if part == 0:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        return hold_then_decay(config, config.lr, step, ends[0])
    start = held[part - 1]
    return hold_then_decay(config, start["lr"], step - start["step"], ends[part] - start["step"])


def hold_then_decay(config: TrainConfig, rate: float, step: int, steps: int) -> float:
    """`rate` at step `step` of `steps`, then linear decay to min_lr over the last decay_fraction of them."""
    decay_steps = int(steps * config.decay_fraction)
    decay_start = steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return rate
    frac = (step - decay_start + 1) / decay_steps
    return rate + (config.min_lr - rate) * min(frac, 1.0)


class Objective(nn.Module):
    """The model behind a forward that returns (masked loss sum, masked count), so that
    accelerate can wrap it (DDP) and run it under autocast. features: the cached frozen-tower
    features of the batch, or None (the frozen tower runs in the step)."""

    def __init__(self, model, kl_weight: float = 0.0, top_k: int = 32, slot_decay: float = 1.0, draft_vocab: int = 0):
        super().__init__()
        self.model, self.kl_weight, self.top_k, self.slot_decay = model, kl_weight, top_k, slot_decay
        self.draft_vocab = draft_vocab  # N: the head over the N most frequent tokens (model.draft_vocab) only

    def forward(
        self, ids: torch.Tensor, t: torch.Tensor, masked: torch.Tensor, features: Features | None = None, weighted: bool = True
    ):
        """weighted: the training loss (slots weighted by slot_decay), else every target alike (the eval loss)."""
        decay = self.slot_decay if weighted else 1.0
        vocab = self.model.draft_vocab.top(self.draft_vocab) if self.draft_vocab else None
        noise = Noise(t, masked)
        loss, count = masked_loss_sum(self.model, ids, noise, features, self.kl_weight, self.top_k, decay, vocab)
        return loss, torch.tensor(count, device=ids.device)


def step_noise(config: TrainConfig, step: int, batch: int) -> Noise:
    """The noise of step `step`: a function of (seed, step) only. The first target of every
    block stays visible (`ar_first`): at generation time it is the context tower's own token."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1)
    return ar_first(sample_noise(batch, config.blocks_per_sequence, config.block_size, gen, config.t_min))


def trainable_parameters(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------ what may change when a run resumes
# The one list of settings that a resumed run may change: where output goes, how often it is
# logged, evaluated and saved, how long one call may run, what is measured at an eval,
# where cached frozen-tower features are read from, where the backbone of a checkpoint to go
# on from lies (its fingerprint is checked), and whether it may be trained longer. None of them
# changes what is trained. Every other TrainConfig field must match the run's; max_steps may
# go down only while the steps already done keep their learning rates (before the decay
# starts), and up only with --extend (`extension`), which never takes the learning rate back
# to its peak.
MAY_CHANGE_ON_RESUME = frozenset(
    {"out", "eval_every", "save_every", "max_minutes", "nfe_prompts", "nfe_threshold", "features", "backbone", "extend"}
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def schedule_keeps_done_steps(config: TrainConfig, old_max_steps: int, done: int, extensions: list[dict]) -> bool:
    """Whether the steps already done had the same learning rates with `old_max_steps`."""
    old = dataclasses.replace(config, max_steps=old_max_steps)
    rates = (learning_rate(old, s, extensions) == learning_rate(config, s, extensions) for s in range(done))
    return done <= config.max_steps and all(rates)


def changed_settings(saved: dict, config: TrainConfig) -> list[str]:
    """'--name old -> new' for every setting that differs from the saved run's and may not."""
    settings, done = saved.get("config", {}), saved["step"]
    changes = []
    for f in dataclasses.fields(TrainConfig):
        old, new = settings.get(f.name, f.default), getattr(config, f.name)
        old, new = (list(v) if isinstance(v, tuple) else v for v in (old, new))  # a list once saved as JSON
        if f.name in MAY_CHANGE_ON_RESUME or old == new:
            continue
        if f.name == "max_steps" and (
            config.extend if new > old else schedule_keeps_done_steps(config, old, done, saved.get("extensions", []))
        ):
            continue
        changes.append(f"{flag(f.name)} {old} -> {new}")
    return changes


def kept_held_out(saved: dict, config: TrainConfig) -> TrainConfig:
    """A run that held out an explicit number of sequences (as every run before the 10% rule did)
    keeps that number when resumed without --eval-sequences: the same split, the same run."""
    held = saved.get("config", {}).get("eval_sequences")
    return config if config.eval_sequences is not None or held is None else dataclasses.replace(config, eval_sequences=held)


TRAIN_LONGER = "to train it longer, add --extend to a larger --max-steps (the learning rate goes on from where it is)"


def refuse_other_settings(out: Path, saved: dict, config: TrainConfig) -> None:
    changes = changed_settings(saved, config)
    if not changes:
        return
    old_max = saved.get("config", {}).get("max_steps", 0)
    longer = f"; {TRAIN_LONGER}" if config.max_steps > old_max and not config.extend else ""
    raise TwoTowerError(
        f"{out} holds a run (at step {saved['step']}) with other settings: {', '.join(changes)}; "
        f"to resume it, run with its settings; to train with these, choose a new --out{longer}"
    )


def extension(saved: dict, config: TrainConfig) -> dict | None:
    """What `--extend` records in the run state when config.max_steps is above the saved run's
    (None otherwise): the step, max_steps before and after, and "lr": the learning rate of the
    last step done, held from here on and then decayed over the steps added; None where the
    steps done keep their rates under the new max_steps (warmup or stable phase: the schedule
    just ends later)."""
    old_max, done, extensions = saved["config"]["max_steps"], saved["step"], saved.get("extensions", [])
    if config.max_steps <= old_max:
        return None
    lr = None
    if not schedule_keeps_done_steps(config, old_max, done, extensions):
        lr = learning_rate(dataclasses.replace(config, max_steps=old_max), done - 1, extensions)
    return {"step": done, "max_steps": old_max, "to": config.max_steps, "lr": lr}


def describe_extension(config: TrainConfig, ext: dict) -> str:
    """The line printed when a run is made longer: what its learning rate does from here."""
    start = 0 if ext["lr"] is None else ext["step"]
    decay = int((config.max_steps - start) * config.decay_fraction)
    tail = f", then decays to {config.min_lr:g} over steps {config.max_steps - decay + 1}-{config.max_steps}" if decay else ""
    if ext["lr"] is None:
        how = f"the steps done keep their learning rates{tail}"
    elif math.isclose(ext["lr"], config.min_lr):
        how = f"the learning rate stays at its final {ext['lr']:.3g} (not back to the peak {config.lr:g})"
    else:
        how = f"the learning rate goes on from {ext['lr']:.3g} (not back to the peak {config.lr:g}){tail}"
    return f"training longer: --max-steps {ext['max_steps']} -> {ext['to']} at step {ext['step']}: {how}"


# ------------------------------------------------------------------ checkpoints (safetensors + JSON)
FINAL_FILES = ("config.json", "denoiser.safetensors")  # what a checkpoint shares with final/
CHECKPOINT_FILES = (*FINAL_FILES, "optimizer.safetensors", "state.json")


def save_checkpoint(folder: Path, model, optimizer, state: dict, previous: int = 0) -> None:
    """Write model, optimizer and run state to folder/step-N, atomically (temp folder, rename),
    then point folder/latest at it and remove every other checkpoint but step-`previous`, the
    one the run went on from: with two kept, a kill at any moment or a damaged newest one
    leaves one to resume from. The model's config records the training tokens its weights have
    seen (this run's, and those of a checkpoint it went on from), so the weights and their config
    always agree."""
    final = folder / f"step-{state['step']}"
    tmp = folder / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.trained_tokens = state.get("tokens_before", 0) + state["training_tokens"]
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
    keep = {final.name, f"step-{previous}"}
    for old in [*folder.glob("step-*"), *folder.glob(".tmp-step-*")]:  # older ones, and those a kill left half written
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def publish_final(checkpoint: Path, final: Path) -> bool:
    """Make `final` the model of the run's last checkpoint (its config and weights, copied
    atomically). Returns False, touching nothing, where `final` already holds exactly those."""
    names = [*FINAL_FILES, *(n for n in (draft_vocab.FILE_NAME,) if (checkpoint / n).is_file())]  # and its draft vocabulary
    if all((final / name).is_file() and filecmp.cmp(checkpoint / name, final / name, shallow=False) for name in names):
        return False
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in names:
        shutil.copyfile(checkpoint / name, tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return True


@dataclass
class Checkpoint:
    """A checkpoint read whole, so that one which does not load is found before any work."""

    folder: Path
    state: dict  # the run state: step, losses, tokens, config, the optimizer's param groups
    trained: dict[str, torch.Tensor]  # denoiser.safetensors: the trained tensors
    optimizer: dict[str, torch.Tensor]  # optimizer.safetensors: "{parameter index}.{name}"


def read_checkpoint(folder: Path) -> Checkpoint:
    """Every file of a checkpoint, or one TwoTowerError saying what is wrong with it."""
    if not folder.is_dir():
        raise TwoTowerError("the folder is missing")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise TwoTowerError(f"{', '.join(missing)} missing")
    tensors, texts = {}, {}
    for name in CHECKPOINT_FILES:
        try:
            if name.endswith(".safetensors"):
                tensors[name] = load_file(str(folder / name))
            else:
                texts[name] = json.loads((folder / name).read_text())
        except (SafetensorError, OSError, ValueError) as err:
            raise TwoTowerError(f"{name} is truncated or corrupt ({str(err).splitlines()[0]})") from err
    state = texts["state.json"]
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and "param_groups" in state):
        raise TwoTowerError("state.json is not a run state")
    if not isinstance(texts["config.json"], dict):
        raise TwoTowerError("config.json is not a model config")
    return Checkpoint(folder, state, tensors["denoiser.safetensors"], tensors["optimizer.safetensors"])


def _step_of(folder: Path) -> int:
    number = folder.name.removeprefix("step-")
    return int(number) if number.isdigit() else -1


def checkpoint_folders(out: Path) -> list[Path]:
    """A run's checkpoints, newest first: the one out/latest names, then the others by step."""
    folders = sorted((f for f in out.glob("step-*") if _step_of(f) >= 0), key=_step_of, reverse=True)
    pointer = out / "latest"
    if pointer.is_file():
        named = out / pointer.read_text().strip()
        folders = [named, *(f for f in folders if f != named)]
    return folders


def resume_point(out: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of the run in `out` that loads (None: no checkpoint, a new run),
    and one line for each newer one that does not, naming it and what is wrong (a kill cannot
    leave such a one, a full disk or a bad copy can). None loads: one TwoTowerError."""
    damaged = []
    for folder in checkpoint_folders(out):
        try:
            return read_checkpoint(folder), damaged
        except TwoTowerError as err:
            damaged.append(f"checkpoint {folder} cannot be used: {err}")
    if damaged:
        raise TwoTowerError(
            f"no checkpoint in {out} can be used ({'; '.join(damaged)}): to start the run over, remove {out} or "
            "choose a new --out"
        )
    return None, damaged


def load_checkpoint(checkpoint: Checkpoint, model, optimizer) -> dict:
    """Put a checkpoint's trained tensors into the model and its state into the optimizer;
    returns its run state (without the optimizer's param groups)."""
    from twotower.model.checkpoint import set_trained_state

    set_trained_state(model, checkpoint.trained, checkpoint.folder / "denoiser.safetensors")
    per_param: dict[int, dict] = {}
    for key, value in checkpoint.optimizer.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    state = dict(checkpoint.state)
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


def _truncate_log(log: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they are done again)."""
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in lines))


# ------------------------------------------------------------------ stopping: Ctrl-C and SIGTERM
class TrainingStopped(TwoTowerError):
    """A run stopped by Ctrl-C or SIGTERM; the message names the step saved and says that the
    same command resumes. exit_code: what a command line returns (130, as after Ctrl-C)."""

    exit_code = 130


@dataclass
class StopRequest:
    requested: bool = False


@contextlib.contextmanager
def stop_requests():
    """While training: a first SIGINT or SIGTERM asks the run to stop after the step in
    progress (it is saved); a second one stops at once (KeyboardInterrupt). Outside the main
    thread (no signal handlers there) Ctrl-C stays a plain KeyboardInterrupt."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        say("stopping after this step, with a checkpoint (Ctrl-C again stops at once)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def say(text: str) -> None:
    """One line for the person at the terminal (stderr: stdout carries the command's JSON),
    above the progress bar if one is drawn."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


# ------------------------------------------------------------------ setting a run up
def build_model(config: TrainConfig):
    """A backbone wrapped as a new two-tower model with the config's denoiser settings, or a
    twotower checkpoint to go on from (load_model tells them apart; a checkpoint keeps its own,
    but gets a fusion, zero at first, where fuse_layers asks for one and it has none).
    With a bf16 backbone the small trained tensors (LoRA, adaLN, the mask embedding) are kept in
    fp32, so that AdamW's updates are not rounded away."""
    from twotower.model.loading import load_model

    dtype = torch.float32 if config.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(config.seed)  # LoRA A matrices
    model, tokenizer = load_model(
        config.model,
        dtype=dtype,
        shipped=False,
        backbone=config.backbone,
        denoiser=config.denoiser,
        layout=config.layout,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        adaln=config.adaln,
        block_size=config.block_size,
        denoiser_depth=config.denoiser_depth,
        alignment=config.alignment,
        fuse_layers=list(config.fuse_layers) or None,
    )
    if config.fuse_layers and not model.config.fuse_layers:  # a checkpoint without one
        model.add_fusion(list(config.fuse_layers))
    for module in (model.lora, model.time_conditioning, model.denoiser.fusion):
        if module is not None:
            module.float()
    model.mask_embedding.data = model.mask_embedding.data.float()
    return model, tokenizer


def check_model(model, config: TrainConfig) -> None:
    if model.config.block_size != config.block_size or model.config.layout != config.layout:
        raise TwoTowerError(
            f"the model is a {model.config.layout} S={model.config.block_size} two-tower model but the config asks "
            f"for {config.layout} S={config.block_size}"
        )


def make_accelerator(config: TrainConfig):
    """accelerate's Accelerator for the config: bf16 autocast on CUDA under "auto", FSDP when asked."""
    from accelerate import Accelerator

    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    plugin = None
    if config.fsdp:  # shard the trained weights over the processes instead of replicating them (validate: GPUs only)
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(use_orig_params=True, sync_module_states=True)
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if config.batch_size % (accelerator.num_processes * config.grad_accum):
        raise TwoTowerError(
            f"batch_size {config.batch_size} is not a multiple of devices x grad_accum = "
            f"{accelerator.num_processes * config.grad_accum}"
        )
    return accelerator


@dataclass
class TrainingData:
    train: torch.Tensor  # (T, L) long: the sequences trained on
    eval: torch.Tensor  # (E, L) long: the held-out ones (the last of the packed data)
    store: FeatureStore | None  # their cached frozen-tower features (every packed sequence), or None
    refused: int  # rows left out because their prompt is a held-out evaluation prompt


def prepare_data(config: TrainConfig, model, tokenizer, main: bool, progress: bool) -> TrainingData:
    """Read, pack and split the data (the split reported in one line), and cache its features."""
    packed = pack(read_sources(config.data, config.max_rows), tokenizer, config.seq_len, heldout_prompts())
    held = packed.held_out(config.eval_sequences, config.max_eval_sequences)
    train_seqs, eval_seqs = packed.split(held, config.batch_size)
    if main:
        say(packed.describe_split(held, chosen=config.eval_sequences is not None))
    # The training tokens by frequency, saved with every checkpoint: verify's --draft-vocab and
    # --draft-vocab here read their N most frequent.
    model.draft_vocab = draft_vocab.count_tokens([train_seqs.flatten()], model.num_embeddings)
    model.config.head_vocab = config.draft_vocab  # what the head is trained over from here on
    if main and config.draft_vocab:
        say(f"draft vocabulary: the {config.draft_vocab} most frequent tokens, "
            f"{100 * model.draft_vocab.coverage(config.draft_vocab):.1f}% of the training tokens")  # fmt: skip
    store = None
    if config.features:  # the frozen tower runs once per sequence, here, instead of in every step
        folder = config.features
        if folder == AUTO_FEATURES:
            folder = keyed_folder(model, packed.sequences, config.block_size, config.top_k, config.data)
        store = build_features(model, packed.sequences, folder, config.block_size, config.top_k, progress=progress)
    return TrainingData(train_seqs, eval_seqs, store, packed.refused)


@dataclass
class Run:
    """A run in progress: what every step reads (settings, model, data, optimizer) and the
    run state it writes (step, losses, tokens, seconds; saved in every checkpoint)."""

    config: TrainConfig
    out: Path
    model: nn.Module
    tokenizer: object
    data: TrainingData
    accelerator: object
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    state: dict
    saved_step: int = 0  # the step of the newest checkpoint (0: none)
    updating: bool = False  # from the optimizer step of a step until its log line: not a state to save

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def start_run(config: TrainConfig, out: Path, model, tokenizer, data: TrainingData, accelerator, resume) -> Run:
    """The optimizer and the run state, fresh or loaded from the checkpoint `resume` (or
    None; a larger max_steps with --extend adds its `extension` to the state), and the model
    placed for accelerate."""
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    state = {
        "step": 0,
        "losses": [],
        "eval_losses": [],
        "training_tokens": 0,
        "seconds": 0.0,
        "config": dataclasses.asdict(config),
        "refused_heldout_rows": data.refused,
        "extensions": [],
        "tokens_before": model.config.trained_tokens,  # a checkpoint gone on from had seen these
    }
    if resume is not None:
        longer = extension(resume.state, config)
        state = {**load_checkpoint(resume, model, optimizer), "config": dataclasses.asdict(config)}
        state["extensions"] = [*state.get("extensions", []), *([longer] if longer else [])]
        if accelerator.is_main_process:
            _truncate_log(out / "log.jsonl", state["step"])
            say(f"resuming from step {state['step']} of {config.max_steps} ({resume.folder})")
            if longer:
                say(describe_extension(config, longer))
    model.to(accelerator.device)
    objective = Objective(model, config.kl_weight, config.top_k, config.slot_decay, config.draft_vocab)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    return Run(config, out, model, tokenizer, data, accelerator, objective, optimizer, params, state, state["step"])


# ------------------------------------------------------------------ one step
def accumulate_gradients(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this process's share of step `step`'s batch, in micro-batches
    (gradients summed; DDP syncs on the last). Returns (loss sum, masked count) over processes."""
    config, accelerator = run.config, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    per_device = config.batch_size // world
    indices = batch_indices(len(run.data.train), config.batch_size, step, config.seed)
    noise = step_noise(config, step, config.batch_size)
    mine = slice(rank * per_device, (rank + 1) * per_device)
    indices, noise = indices[mine], Noise(noise.t[mine], noise.masked[mine])
    total_loss = torch.zeros((), device=run.device)
    total_count = torch.zeros((), device=run.device, dtype=torch.long)
    micro = per_device // config.grad_accum
    chunks = list(zip(indices.split(micro), noise.split(micro)))
    for i, (chunk, chunk_noise) in enumerate(chunks):
        sync = i == len(chunks) - 1
        ids, features = _read(run.data.train, run.data.store, chunk, run.model, run.device)
        with accelerator.no_sync(run.objective) if not sync else contextlib.nullcontext(), accelerator.autocast():
            loss, count = run.objective(ids, chunk_noise.t.to(run.device), chunk_noise.masked.to(run.device), features)
        accelerator.backward(loss)
        total_loss += loss.detach()
        total_count += count
    return accelerator.reduce(total_loss, "sum"), accelerator.reduce(total_count, "sum")


def apply_update(run: Run, total_count: torch.Tensor) -> float:
    """Turn the summed gradients into the mean over every masked target, clip, and take the
    optimizer step. Returns the gradient norm before clipping."""
    run.updating = True
    scale = run.accelerator.num_processes / max(int(total_count), 1)  # DDP averages over devices: undo, divide by all
    for p in run.params:
        if p.grad is not None:
            p.grad.mul_(scale)
    clip = run.config.clip if run.config.clip > 0 else float("inf")
    grad_norm = float(run.accelerator.clip_grad_norm_(run.params, clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_step(run: Run) -> dict:
    """One optimizer step; updates the run state and returns the step's log record."""
    config, state = run.config, run.state
    step, begin = state["step"], time.perf_counter()
    rate = learning_rate(config, step, state["extensions"])
    for group in run.optimizer.param_groups:
        group["lr"] = rate
    total_loss, total_count = accumulate_gradients(run, step)
    value = (total_loss / total_count.clamp(min=1)).item()
    if not math.isfinite(value):
        last = run.out / f"step-{run.saved_step}" if run.saved_step else "none"
        raise TwoTowerError(
            f"the loss is {value} at step {step + 1}: stopped without saving this step "
            f"(last checkpoint: {last}); lower --lr or check the data"
        )
    grad_norm = apply_update(run, total_count)
    state["step"] = step + 1
    state["losses"].append(value)
    state["training_tokens"] += config.batch_size * config.seq_len
    state["masked_tokens"] = state.get("masked_tokens", 0) + int(total_count)
    state["seconds"] += time.perf_counter() - begin
    return {
        "step": step + 1,
        "loss": value,
        "grad_norm": grad_norm,
        "lr": rate,
        "training_tokens": state["training_tokens"],
        "masked_tokens": state["masked_tokens"],
        "seconds": round(state["seconds"], 3),
    }


def evaluate(run: Run, record: dict) -> None:
    """At every eval_every-th step: the held-out loss (and tokens per denoiser pass) into the
    record and the run state."""
    config, state = run.config, run.state
    if not config.eval_every or record["step"] % config.eval_every:
        return
    loss = eval_loss(run.objective, run.data.eval, config, run.accelerator, run.data.store, run.model)
    state["eval_losses"].append([record["step"], loss])
    record["eval_loss"] = loss
    if config.nfe_prompts and run.tokenizer is not None:
        record["tokens_per_nfe"] = tokens_per_nfe(run.model, run.tokenizer, config)
        state.setdefault("nfe_curve", []).append([state["training_tokens"], record["tokens_per_nfe"]])


def log_step(run: Run, record: dict, bar) -> None:
    if not run.main:
        return
    with open(run.out / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    bar.update(1)
    speed = run.state["masked_tokens"] / max(run.state["seconds"], 1e-9)
    bar.set_postfix(loss=f"{record['loss']:.3f}", masked_tok_s=f"{speed:.0f}")


def save(run: Run) -> None:
    if run.main:
        save_checkpoint(run.out, run.model, run.optimizer, run.state, previous=run.saved_step)
    run.saved_step = run.state["step"]


# ------------------------------------------------------------------ the loop
def run_steps(run: Run, stop: StopRequest, last: int, progress: bool) -> None:
    """Steps until `last`, max_minutes or a stop request (which saves, then raises TrainingStopped)."""
    from tqdm.auto import tqdm

    config, state = run.config, run.state
    deadline = time.monotonic() + 60 * config.max_minutes if config.max_minutes > 0 else None
    with tqdm(total=config.max_steps, initial=state["step"], desc="train", disable=not (progress and run.main)) as bar:
        while state["step"] < last:
            record = train_step(run)
            evaluate(run, record)
            out_of_time = deadline is not None and _agree(run.accelerator, time.monotonic() > deadline)
            stopping = _agree(run.accelerator, stop.requested)
            log_step(run, record, bar)
            step = state["step"]
            if step % config.save_every == 0 or step == config.max_steps or out_of_time or stopping:
                save(run)
            run.updating = False
            if stopping:
                raise stopped(run)
            if out_of_time:
                return


def stopped(run: Run) -> TrainingStopped:
    """The one line for a run stopped by Ctrl-C or SIGTERM. A single process caught between two
    steps first saves the last step done (its weights, optimizer and state agree)."""
    step = run.state["step"]
    if not run.updating and step > run.saved_step and run.accelerator.num_processes == 1:
        save(run)
    if run.saved_step == 0:
        return TrainingStopped(f"stopped at step {step}, before the first checkpoint: the same command starts again")
    where = run.out / f"step-{run.saved_step}"
    if run.saved_step == step:
        return TrainingStopped(f"stopped at step {step} (saved {where}); run the same command to resume")
    return TrainingStopped(f"stopped at step {step}; step {run.saved_step} is saved ({where}): run the same command to resume")


def finished_run(out: Path, last: Checkpoint, main: bool) -> dict:
    """A rerun of a finished run: final/ is left as it is (or rewritten from the last
    checkpoint where it is missing or differs), and one line says so."""
    final = out / "final"
    if main:
        rewritten = publish_final(last.folder, final)
        how = f"{final} written from {last.folder.name}" if rewritten else f"its model: {final}"
        say(f"{out} already finished at step {last.state['step']} ({how}); {TRAIN_LONGER}")
    state = {k: v for k, v in last.state.items() if k != "param_groups"}
    return {**state, "main_process": main}


def train(config: TrainConfig, model=None, tokenizer=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a training run. `model`/`tokenizer` may be given (tests); otherwise
    they are loaded from `config.model`. `stop_after` ends the call after that many steps
    of this call (as a kill would). Ctrl-C or SIGTERM saves the last step done and raises
    TrainingStopped. Returns the run state: step, losses, eval losses."""
    config.validate()
    out = Path(config.out)
    resume, damaged = resume_point(out)  # the newest checkpoint that loads
    if resume is not None:
        config = kept_held_out(resume.state, config)
        refuse_other_settings(out, resume.state, config)  # before any work
    accelerator = make_accelerator(config)
    if accelerator.is_main_process and damaged:
        say(f"{'; '.join(damaged)}: going on from the one before it, {resume.folder}")
    if resume is not None and resume.state["step"] >= config.max_steps:
        return finished_run(out, resume, accelerator.is_main_process)
    try:
        if model is None:
            model, tokenizer = build_model(config)
        check_model(model, config)
        data = prepare_data(config, model, tokenizer, accelerator.is_main_process, progress)
    except KeyboardInterrupt:  # nothing trained yet; cached features are kept shard by shard
        raise TrainingStopped("stopped before the first step of this call: run the same command to go on") from None
    out.mkdir(parents=True, exist_ok=True)  # once the model and the data are found: a refused run leaves nothing
    run = start_run(config, out, model, tokenizer, data, accelerator, resume)
    last = config.max_steps if stop_after is None else min(config.max_steps, run.state["step"] + stop_after)
    try:
        with stop_requests() as stop:
            run_steps(run, stop, last, progress)
    except KeyboardInterrupt:
        raise stopped(run) from None
    if run.state["step"] == config.max_steps and run.main:
        publish_final(run.out / f"step-{run.saved_step}", out / "final")
    return {**run.state, "main_process": run.main}


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
            t, masked = chunk_noise.t.to(accelerator.device), chunk_noise.masked.to(accelerator.device)
            loss, n = objective(ids, t, masked, features, weighted=False)
        total, count = total + float(loss), count + int(n)
    return total / max(count, 1)
