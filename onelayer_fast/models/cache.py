"""Models built once on first use and cached in the user's cache directory (SmolLM2's conversion, and
toy-arith builds: the shipped weights need no cache, other recipes do).

A build writes into its own temp dir beside the target and is renamed into place, so a reader never
sees a half-written model and a killed build leaves nothing under the final name. An flock makes
concurrent first users build once; correctness does not depend on it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

MODEL_FILES = ("config.json", "model.safetensors")


def cache_root() -> Path:
    """$ONELAYER_FAST_CACHE, else $XDG_CACHE_HOME/onelayer_fast, else ~/.cache/onelayer_fast."""
    if os.environ.get("ONELAYER_FAST_CACHE"):
        return Path(os.environ["ONELAYER_FAST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "onelayer_fast"


def is_complete(directory: Path, files: tuple[str, ...] = MODEL_FILES) -> bool:
    return all((directory / name).is_file() for name in files)


@contextmanager
def build_lock(path: Path):
    """An exclusive POSIX flock on `path`; a no-op where flock does not exist (builders then race harmlessly)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temp_dirs(target: Path, max_age_s: float = 24 * 3600) -> None:
    """Temp dirs of builders that were killed; a live build never takes a day."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.tmp*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def build_once(target: Path, build: Callable[[Path], dict], files: tuple[str, ...] = MODEL_FILES,
               announce: Callable[[], None] | None = None) -> dict | None:
    """Make `target` by `build(temp_dir)` unless it is complete; returns build's summary, or None if cached."""
    if is_complete(target, files):
        return None
    with build_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target, files):  # another process built it while we waited for the lock
            return None
        remove_stale_temp_dirs(target)
        if announce is not None:
            announce()
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
        temp.chmod(0o755)  # mkdtemp makes it owner-only; the final dir should look like any other
        try:
            summary = build(temp)
            if target.exists() and not is_complete(target, files):  # a leftover, e.g. an interrupted hand copy
                shutil.rmtree(target)
            try:
                os.replace(temp, target)
            except OSError:
                if not is_complete(target, files):
                    raise
                # Without flock, another builder may have renamed its (identical) build first: keep it.
        finally:
            shutil.rmtree(temp, ignore_errors=True)  # gone already after a successful rename
    return summary
