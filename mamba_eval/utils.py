"""Small helpers shared by every layer: atomic file writes (a reader sees the old file or the
whole new one, never a part), JSON reading, the cache and data folders.

Standard library only (imported by command modules at start-up).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file in the same folder,
    flushed to disk, then ``os.replace``; the folder is synced so the rename is durable too."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_move(written: Path, target: Path) -> None:
    """Move a complete file that another writer made to ``target`` atomically: flushed to disk,
    renamed over ``target`` (same file system), the folder synced so the rename is durable."""
    fd = os.open(written, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(written, target)
    fsync_dir(Path(target).parent)


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_json(path: Path, data) -> None:
    """``data`` as indented, key-sorted JSON (non-JSON values as ``str``), written atomically."""
    import json

    atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    """The JSON value in ``path``, or None when the file is missing, unreadable or not JSON."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def looks_like_path(name: str) -> bool:
    """Whether a checkpoint or tokenizer name is a local path rather than a Hub id: Hub ids are
    ``name`` or ``owner/name``; anything else with a slash, or a leading ``/ . ~``, is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


#: The environment variable that names the offline data folder (``mamba-eval --data-dir``).
DATA_DIR_ENV = "MAMBA_EVAL_DATA_DIR"


def data_dir_from_env() -> Path | None:
    """The data folder named by ``$MAMBA_EVAL_DATA_DIR`` (``~`` expanded), or None when unset or
    empty. The folder itself is not checked here."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir(*parts: str) -> Path:
    """A folder under the package's cache root, ``$XDG_CACHE_HOME/mamba_eval`` (``~/.cache``
    when XDG_CACHE_HOME is unset or empty): ``cache_dir("offline")``, ``cache_dir("task_index")``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache").joinpath("mamba_eval", *parts)
