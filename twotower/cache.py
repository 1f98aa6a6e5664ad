"""What twotower keeps on disk between runs, under `$TWOTOWER_CACHE` (default
`~/.cache/twotower`): dequantised GGUF backbones under backbones/ (one folder per file, dtype and
fingerprint), training features under features/ (`train --features auto`: one folder per data
and settings), and whatever else lives there. `twotower cache list` shows each entry with its size
and the total; `twotower cache clear [NAME ...]` removes them. No torch here: the command answers
at once.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from twotower.settings import TwoTowerError

GROUPS = ("backbones", "features")  # folders whose every item is one entry


def lock_path(folder: Path) -> Path:
    """The lock file beside a folder that one process at a time writes (a GGUF conversion, a
    features build), so that a second one started meanwhile waits for the first. Beside it, not
    in it: a write refused before it starts leaves the folder as it was."""
    return folder.with_name(f".{folder.name}.lock")


def lock_beside(folder: Path):
    """A `filelock.FileLock` on `lock_path(folder)`."""
    from filelock import FileLock

    return FileLock(lock_path(folder))


def cache_dir() -> Path:
    return Path(os.environ.get("TWOTOWER_CACHE", Path.home() / ".cache" / "twotower"))


@dataclass
class Entry:
    name: str  # its path under the cache folder, as `list` shows it and `clear` takes it
    path: Path
    size: int  # bytes


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum((Path(root) / name).lstat().st_size for root, _, files in os.walk(path) for name in files)


def entries(root: Path | None = None) -> list[Entry]:
    """Each item of the cache: every one under a group folder (a converted backbone, or what an
    interrupted conversion left), and every other file or folder at the top."""
    root = cache_dir() if root is None else root
    if not root.is_dir():
        return []
    found = []
    for item in sorted(root.iterdir()):
        inside = sorted(item.iterdir()) if item.name in GROUPS and item.is_dir() and not item.is_symlink() else [item]
        found += [Entry(str(path.relative_to(root)), path, size_of(path)) for path in inside if not _is_lock(path)]
    return found


def _is_lock(path: Path) -> bool:
    """An empty lock file kept beside a folder (`lock_path`): not an entry."""
    return path.name.startswith(".") and path.name.endswith(".lock") and path.is_file()


def human(size: float) -> str:
    if size < 1000:
        return f"{size} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}"


def describe(root: Path | None = None) -> str:
    """The lines of `twotower cache list`: each entry and its size, then the total."""
    root = cache_dir() if root is None else root
    found = entries(root)
    if not found:
        return f"nothing cached in {root}"
    width = max(len(e.name) for e in found)
    lines = [f"{e.name:<{width}}  {human(e.size):>9}" for e in found]
    total = sum(e.size for e in found)
    lines.append(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}, {human(total)} in {root}")
    return "\n".join(lines)


def clear(names: list[str], root: Path | None = None) -> list[str]:
    """Remove the named entries (all of them without names), asking nothing; returns one line
    per entry removed and one with the space freed. An unknown name removes nothing."""
    root = cache_dir() if root is None else root
    found = {e.name: e for e in entries(root)}
    names = list(dict.fromkeys(n.rstrip("/") for n in names))
    unknown = [n for n in names if n not in found]
    if unknown:
        known = ", ".join(found) or "none"
        raise TwoTowerError(
            f"no cache entry named {', '.join(unknown)} in {root} (entries: {known}); `twotower cache list` shows them"
        )
    chosen = [found[n] for n in names] if names else list(found.values())
    lines = []
    for entry in chosen:
        if entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
        lock_path(entry.path).unlink(missing_ok=True)  # its lock, if any
        lines.append(f"removed {entry.name} ({human(entry.size)})")
    lines.append(f"freed {human(sum(e.size for e in chosen))} in {root}")
    return lines
