"""Command line: `twotower generate ...`. Each subcommand calls exactly one library function
with the settings objects of `twotower/settings.py`, whose fields generate its flags (help,
default, check): a knob added there is a flag here. Building the parser imports nothing heavy,
so `--help` and a mistyped flag answer at once; torch loads when a command runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from twotower.settings import (
    DTYPES,
    MODES,
    BenchOptions,
    DistillOptions,
    EvalOptions,
    GenerationSettings,
    LoadOptions,
    ServeOptions,
    TrainConfig,
    TwoTowerError,
    VerifyOptions,
    check_value,
    refuse_inapplicable,
)


# ------------------------------------------------------------------ flags from dataclass fields
def _converter(type_text: str):
    return int if "int" in type_text else float if "float" in type_text else str


GIVEN_NONE = object()  # `--flag None` for a field that may be None: given (it overrides a preset), unlike a flag left out


def _parse(f: dataclasses.Field):
    """An argparse type for a field: convert the text (a comma-separated list for a list
    field), then run the field's own check, with a message that says what is wanted."""
    text_type = str(f.type)
    listed = text_type.startswith("tuple")
    convert = _converter(text_type.split("[", 1)[-1] if listed else text_type)
    noun = {int: "an integer", float: "a number"}.get(convert)

    def one(text: str):
        if convert is int and text.strip().lower() == "none" and "None" in text_type:
            return GIVEN_NONE
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None

    def parse(text: str):
        value = [one(part.strip()) for part in text.split(",") if part.strip()] if listed else one(text)
        try:
            check_value(f.name, f.metadata, None if value is GIVEN_NONE else value)
        except TwoTowerError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    return parse


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_knobs(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One flag per field of a settings dataclass; its default stays None, so that a command
    knows which flags were given (`given`). defaults: shown instead of the field's (a preset)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("flag") == "":
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        help_text = meta.get("help", "")
        help_text += "" if "(default:" in help_text else f" (default: {_shown(default)})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        listed = str(f.type).startswith("tuple")
        choices = None if listed else meta.get("choices")
        metavar = meta.get("metavar") or (f"{f.name.upper()},..." if listed else None if choices else f.name.upper())
        kind = str if choices else _parse(f)
        parser.add_argument(flag, dest=f.name, type=kind, choices=choices, default=None, metavar=metavar, help=help_text)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of cls whose flags were given."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return {name: None if value is GIVEN_NONE else value for name, value in values.items() if value is not None}


def options(args: argparse.Namespace, cls):
    return cls(**given(args, cls))


# ------------------------------------------------------------------ the parser
COMMANDS = {  # name: (help, the settings classes whose fields are its flags)
    "generate": ("generate a reply to one prompt", (LoadOptions, GenerationSettings, VerifyOptions)),
    "eval": (
        "quality: accuracy per category, agreement with AR, judge perplexity, quality retention",
        (LoadOptions, EvalOptions),
    ),
    "bench": ("speed: tokens/s per mode at each batch size, next to AR, transformers and llama.cpp", (LoadOptions, BenchOptions)),
    "serve": (
        "an OpenAI-compatible HTTP server (chat and completions, streaming, continuous batching)",
        (LoadOptions, ServeOptions),
    ),
    "train": ("train the denoiser (one-pass block-diffusion objective); the same command resumes", (TrainConfig,)),
    "distill": ("make self-distilled training data with the backbone itself", (DistillOptions,)),
}


def build_parser(preset: dict | None = None) -> argparse.ArgumentParser:
    """preset: the values of a training preset (train --config), shown as train's defaults."""
    parser = argparse.ArgumentParser(
        prog="twotower",
        description="Two-tower block diffusion on a pretrained AR model: a frozen context tower "
        "and a denoiser tower that fills blocks of tokens in parallel.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, classes) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        command.set_defaults(func=globals()["cmd_" + name])
        if name == "generate":
            command.add_argument("prompt", metavar="PROMPT", help="the user message (or raw text with --no-chat)")
            command.add_argument(
                "--mode",
                choices=list(MODES),
                default="ar",
                help="ar: context tower, one token per pass; mock-ar: denoiser, one token per pass; diffusion: the "
                "denoiser fills blocks by mask diffusion; verify: drafts checked by the context tower, AR's output "
                "(docs/verify.md) (default: %(default)s)",
            )
            command.add_argument("--no-chat", action="store_true", help="feed PROMPT as raw text, without the chat template")
            command.add_argument("--stream", action="store_true", help="print text as it becomes final (with --json: JSON lines)")
            command.add_argument("--json", action="store_true", help="print the text and the statistics as one JSON object")
        if name == "train":
            command.add_argument("--config", metavar="FILE.yaml", help="preset (configs/*.yaml): its values override the "
                                 "defaults shown below (`train --config FILE --help` shows them); flags override it")  # fmt: skip
        for cls in classes:
            add_knobs(command, cls, preset if name == "train" else None)
    convert = sub.add_parser(
        "convert",
        help="dequantise a GGUF backbone once into the safetensors cache",
        description="Dequantise a .gguf file (or the default backbone) into the safetensors cache that later "
        "loads read; prints the cache folder.",
    )
    convert.add_argument("model", nargs="?", default="default", metavar="MODEL", help="a .gguf file or 'default'")
    convert.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default: %(default)s)")
    convert.set_defaults(func=cmd_convert)
    add_cache_command(sub)
    vocab = sub.add_parser(
        "draft-vocab",
        help="store a checkpoint's draft vocabulary, the tokens of its training data by frequency (docs/verify.md)",
        description="Count the tokens of a checkpoint's training data (tokenised as training does) and store them "
        "most frequent first in its draft_vocab.safetensors, which verify mode's --draft-vocab N reads; prints the "
        "coverage, also written into the checkpoint's MODEL_CARD.md where it has one.",
    )
    vocab.add_argument("model", metavar="CHECKPOINT", help="a twotower checkpoint folder")
    vocab.add_argument("data", nargs="+", metavar="DATA", help="its training data files (as `twotower train --data`)")
    vocab.set_defaults(func=cmd_draft_vocab)
    return parser


def add_cache_command(sub) -> None:
    cache = sub.add_parser(
        "cache",
        help="list or clear what twotower caches ($TWOTOWER_CACHE: dequantised GGUF backbones, training features)",
        description="List or clear what twotower keeps under $TWOTOWER_CACHE (default ~/.cache/twotower): "
        "dequantised GGUF backbones under backbones/, training features under features/ (train --features auto), "
        "and whatever else lives there.",
    )
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION", help="list or clear")
    actions.add_parser("list", help="each entry with its size, and the total")
    clear = actions.add_parser("clear", help="remove every entry, or the NAMEs given, asking nothing; prints what it removed")
    clear.add_argument("names", nargs="*", metavar="NAME", help="an entry as `twotower cache list` names it (default: all)")
    cache.set_defaults(func=cmd_cache)


# ------------------------------------------------------------------ the commands
def cmd_generate(args) -> int:
    from twotower.generate import drain, stream
    from twotower.runtime import load_for_inference
    from twotower.text import encode_prompt, eos_token_ids

    chosen = {**given(args, GenerationSettings), **given(args, VerifyOptions)}
    refuse_inapplicable(args.mode, chosen, lambda name: "--" + name.replace("_", "-"))
    settings, verify = options(args, GenerationSettings), options(args, VerifyOptions)
    model, tokenizer = load_for_inference(options(args, LoadOptions), args.mode)
    if args.mode == "diffusion" and not model.config.trained_tokens:
        raise TwoTowerError(
            f"no trained denoiser for {args.model or 'default'}: diffusion mode would write garbage; use --mode ar or "
            "--mode verify (lossless), or train one with `twotower train` (docs/training.md)"
        )
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat)
    settings = dataclasses.replace(settings, eos_token_id=tuple(eos_token_ids(model, tokenizer)))
    extra = verify.to_dict() if args.mode == "verify" else {}
    events = stream(model, args.mode, [ids], settings=settings, **extra)
    result = _print_stream(events, tokenizer, args.json) if args.stream else drain(events)
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


def _print_stream(events, tokenizer, as_json: bool):
    """Print row 0's text as tokens become final (as JSON lines {"delta": ...} with as_json);
    returns the GenerationResult."""
    ids, shown = [], ""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            if not as_json:
                print(flush=True)
            return stop.value
        ids.extend(event.tokens[0])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for the rest of a multi-byte character
            delta, shown = text[len(shown) :], text
            sys.stdout.write(json.dumps({"delta": delta}) + "\n" if as_json else delta)
            sys.stdout.flush()


def cmd_eval(args) -> int:
    from twotower.eval.commands import evaluate

    evaluate(options(args, LoadOptions), options(args, EvalOptions))
    return 0


def cmd_bench(args) -> int:
    from twotower.eval.commands import benchmark

    benchmark(options(args, LoadOptions), options(args, BenchOptions))
    return 0


def cmd_serve(args) -> int:
    try:
        from twotower.serve.app import serve
    except ImportError as err:
        raise TwoTowerError(f"twotower serve needs the serve extra ({err.name} is missing): pip install -e '.[serve]'") from err
    serve(options(args, LoadOptions), options(args, ServeOptions))
    return 0


def cmd_distill(args) -> int:
    from twotower.distill import distill
    from twotower.model.loading import load_model
    from twotower.runtime import torch_dtype

    o = options(args, DistillOptions)
    if not o.out:
        raise TwoTowerError("distill needs --out: the JSONL file or folder to write")
    model, tokenizer = load_model(o.model, dtype=torch_dtype(o.dtype))
    summary = distill(model, tokenizer, o.out, o.rows, o.batch_size, o.seed, o.max_prompt_tokens, o.max_answer_tokens,
                      max_minutes=o.max_minutes)  # fmt: skip
    print(json.dumps(summary))
    return 0


def cmd_train(args) -> int:
    from twotower.train import load_config, train

    config = load_config(args.config, given(args, TrainConfig))
    state = train(config)
    if not state.get("main_process", True):
        return 0
    losses = state["losses"]
    summary = {"step": state["step"], "loss": losses[-1] if losses else None, "eval_losses": state["eval_losses"]}
    summary.update(training_tokens=state["training_tokens"], seconds=round(state["seconds"], 1), out=config.out)
    print(json.dumps(summary))
    return 0


def cmd_convert(args) -> int:
    from twotower.backbones import convert_gguf, resolve_backbone_path
    from twotower.runtime import torch_dtype

    path = resolve_backbone_path(args.model)
    if path.suffix != ".gguf":
        raise TwoTowerError(f"{path} is not a .gguf file: a Hugging Face folder needs no conversion")
    print(convert_gguf(path, torch_dtype(args.dtype)))
    return 0


def cmd_draft_vocab(args) -> int:
    from twotower.data import read_sources, row_tokens
    from twotower.model import draft_vocab
    from twotower.model.checkpoint import WEIGHTS_NAME
    from twotower.model.loading import load_model

    if not (Path(args.model) / WEIGHTS_NAME).is_file():
        raise TwoTowerError(f"{args.model} is not a twotower checkpoint (no {WEIGHTS_NAME})")
    model, tokenizer = load_model(args.model)
    rows = (row_tokens(row, tokenizer) for data in args.data for row in read_sources(data))  # tokenised as training does
    vocab = draft_vocab.count_tokens(rows, model.num_embeddings)
    draft_vocab.save(args.model, vocab)
    draft_vocab.write_card_line(args.model, vocab)
    print(draft_vocab.card_line(vocab))
    return 0


def cmd_cache(args) -> int:
    from twotower import cache

    print(cache.describe() if args.action == "list" else "\n".join(cache.clear(args.names)))
    return 0


def _preset(argv: list[str]) -> dict | None:
    """The YAML preset a `train --config FILE` names, for its --help (None where there is none or
    it cannot be read: the command itself then says why)."""
    if not argv or argv[0] != "train" or "--config" not in argv[:-1]:
        return None
    try:
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            values = yaml.safe_load(f)
    except (OSError, ImportError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser(_preset(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    from transformers.utils import logging as hf_logging  # once a command runs, not for --help

    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except TwoTowerError as err:
        print(f"twotower: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # a training run stopped by Ctrl-C: 130


if __name__ == "__main__":
    sys.exit(main())
