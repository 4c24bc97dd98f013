"""Writing result files atomically: a temporary file in the same folder, then os.replace, so a reader
never sees half a file and a failed run leaves no partial output."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np


def check_file(path: str | os.PathLike, fix: str, label: str = "") -> Path:
    """`path` if it is a regular file (or a link to one); else one line saying what it is instead, then `fix`."""
    path = Path(path)
    if path.is_file():
        return path
    named = f"{label} {path}".strip()
    if path.is_dir():
        raise IsADirectoryError(f"{named} is a folder, expected a file; {fix}")
    if path.exists():
        raise OSError(f"{named} is not a regular file (a device, pipe or socket); {fix}")
    if path.is_symlink():
        raise FileNotFoundError(f"{named} is a link to {os.readlink(path)}, which does not exist; {fix}")
    raise FileNotFoundError(f"{named} does not exist; {fix}")


class OutputNotWritable(PermissionError):
    """An output folder cannot be created or written to."""


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove it is writable; one-line error otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputNotWritable(f"cannot write to output folder {folder} ({error.strerror or error}); "
                                f"make it writable or choose another folder") from None
    return folder


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LOCK = ".d3-plugin.lock"


class FolderInUse(OSError):
    """Another process holds the output folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold an advisory lock (fcntl.flock on `folder/.d3-plugin.lock`) for the `with`: a second run writing
    the same folder is refused in one line instead of overwriting the first's tables. The system releases
    it when the process ends, however it ends; the file stays (removing it would race)."""
    import fcntl

    path = ensure_writable(folder) / LOCK
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise FolderInUse(f"{folder} is in use by another run (pid {holder} holds {path}); wait for it to "
                          f"finish, or pass another {option}") from None
    try:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
    finally:
        handle.close()


class StagedFolder:
    """A result folder built aside and swapped in whole, so a reader of `final` sees the previous complete
    run or the new one, never a mix: files go to the hidden sibling `.NAME.partial-<time>-<pid>`, and
    `publish` moves the old `final` aside, renames the staging folder to `final`, then deletes the old one.
    A run that fails calls `discard`; one that is killed (or interrupted) leaves its hidden staging folder
    (with its log) behind, for `remove_stale` of a later run."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.staging = self.final.with_name(f".{self.final.name}.partial-{self.stamp}")
        self.publishing = False

    def remove_stale(self) -> None:
        """Remove the staging folders of earlier runs into `final` whose process is gone; one whose process
        is alive is another run in progress and is kept."""
        for folder in self.final.parent.glob(f".{glob.escape(self.final.name)}.partial-*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if folder != self.staging and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder of a run that failed (not after a failed publish: it holds the finished
        run, which the error names)."""
        if not self.publishing:
            shutil.rmtree(self.staging, ignore_errors=True)

    def publish(self) -> Path:
        self.publishing = True
        replaced = self.final.with_name(f".{self.final.name}.replaced-{self.stamp}")
        try:
            if self.final.exists():
                self.final.rename(replaced)
            self.staging.rename(self.final)
        except OSError as error:
            raise OutputNotWritable(f"cannot move the finished run {self.staging} to {self.final} "
                                    f"({error.strerror or error}); the previous results are in {replaced}") from None
        shutil.rmtree(replaced, ignore_errors=True)
        return self.final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` (with ordinary permissions),
    on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates owner-only files
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _finite_or_none(value):
    """`value` with every non-finite float replaced by None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data) -> Path:
    """Strict JSON (non-finite numbers are written as null), atomically."""
    text = json.dumps(_finite_or_none(data), indent=2, default=_jsonable, allow_nan=False)
    return write_text(path, text + "\n")


def torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically."""
    import torch

    with atomic_path(path) as temporary:
        torch.save(obj, temporary)
    return Path(path)
