"""Checkpoints as files of at most N MiB, and back: `python scripts/parts.py split CHECKPOINT --out DIR`
and `python scripts/parts.py reassemble DIR --out CHECKPOINT`. A tool for moving files between
machines, not a user command.

A machine lent for a few minutes hands files back in pieces of at most 16 MiB. `split` cuts
every file of a checkpoint folder into numbered parts and writes `parts.json` (each file's
size, SHA-256 and parts); `reassemble` joins them and checks every hash, so a missing, short
or damaged part is an error that names it, never a silently broken checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from twotower.settings import TwoTowerError

MANIFEST = "parts.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(folder: str | os.PathLike, out: str | os.PathLike, max_mb: float = 16.0) -> dict:
    """Cut every file of `folder` into parts of at most max_mb MiB in `out`. Returns the manifest."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise TwoTowerError(f"{folder} is not a checkpoint folder")
    limit = int(max_mb * 2**20)
    if limit < 1:
        raise TwoTowerError("max_mb must be positive")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"files": {}}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        parts = []
        with open(path, "rb") as f:
            for i, chunk in enumerate(iter(lambda: f.read(limit), b"")):
                name = f"{path.name}.part{i:03d}"
                (out / name).write_bytes(chunk)
                parts.append(name)
        if not parts:  # an empty file is one empty part
            (out / f"{path.name}.part000").write_bytes(b"")
            parts = [f"{path.name}.part000"]
        manifest["files"][path.name] = {"size": path.stat().st_size, "sha256": _sha256(path), "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def reassemble(parts: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Join the parts in `parts` into the checkpoint folder `out` (written whole or not at all)."""
    parts, out = Path(parts), Path(out)
    try:
        manifest = json.loads((parts / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise TwoTowerError(f"{parts} holds no readable {MANIFEST}: {err}") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".reassembling-"))
    try:
        for name, entry in manifest["files"].items():
            target = tmp / name
            with open(target, "wb") as f:
                for part in entry["parts"]:
                    if not (parts / part).is_file():
                        raise TwoTowerError(f"part {part} of {name} is missing from {parts}")
                    f.write((parts / part).read_bytes())
            if target.stat().st_size != entry["size"] or _sha256(target) != entry["sha256"]:
                raise TwoTowerError(f"{name} does not match its manifest (a part is damaged or short): fetch its parts again")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/parts.py", description="Cut a checkpoint folder into parts, or join them.")
    sub = parser.add_subparsers(dest="command", required=True)
    cut = sub.add_parser("split", help="cut every file of CHECKPOINT into parts of at most --max-mb MiB, with parts.json")
    cut.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder")
    cut.add_argument("--out", required=True, metavar="DIR", help="folder for the parts")
    cut.add_argument("--max-mb", type=float, default=16.0, metavar="N", help="largest part, MiB (default: %(default)s)")
    join = sub.add_parser("reassemble", help="join the parts listed in DIR/parts.json (hashes checked)")
    join.add_argument("parts", metavar="DIR", help="the folder of parts")
    join.add_argument("--out", required=True, metavar="CHECKPOINT", help="the checkpoint folder to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            manifest = split(args.checkpoint, args.out, args.max_mb)
            print(json.dumps({"out": args.out, "parts": sum(len(e["parts"]) for e in manifest["files"].values())}))
        else:
            print(reassemble(args.parts, args.out))
    except TwoTowerError as err:
        print(f"parts.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
