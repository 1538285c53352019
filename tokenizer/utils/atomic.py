"""Crash-safe writes: everything the project writes to disk (checkpoints, exported models, caches, reports, image
grids) goes through these helpers, so an interrupted run never leaves a half-written file or directory behind.

* A failed write removes its staging directory or temporary file; when it failed because the file system is full
  (``ENOSPC`` / ``EDQUOT``, or a writer that drops the errno while the disk has no space left), the error is a
  :class:`~tokenizer.utils.errors.DiskFullError` that says so and names the output.
* A writer that was killed (``kill -9``, power loss) cannot clean up: its staging directory or temporary file stays.
  While a write is under way, its staging entry is ``flock``-ed (the kernel drops the lock when the writer dies), so
  the next write of the same target removes the entries that no live process holds.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from vfmtok.tokenizer.utils.errors import DiskFullError, InvalidValueError, OutputExistsError, OutputWriteError

__all__ = ["atomic_directory", "atomic_file", "write_text_atomically", "save_pretrained_atomically",
           "removed_on_failure", "reporting_disk_full", "is_disk_full", "remove_stale_partials", "allocated_memmap",
           "plain_mode", "give_plain_modes", "exclusive_lock", "make_directory"]

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What writers that wrap the OS error say (safetensors: "IoError(Os { code: 28, kind: StorageFull, ... })").
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "storagefull", "quotaexceeded", "os error 28",
                   "os error 122")
# Writers that drop the errno (torch.save: "PytorchStreamWriter failed writing file ...: file write failed"): a write
# error while the file system has less than this free counts as disk full.
LOW_SPACE_BYTES = 1 << 20
# Leftovers younger than this are not touched (a live writer locks its staging entry right after creating it).
STALE_AFTER_S = 10.0


def _free_bytes(path: Path) -> Optional[int]:
    """Free bytes (for this user) on the file system holding ``path`` or its nearest existing parent."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            if candidate.exists():
                stats = os.statvfs(candidate)
                return stats.f_bavail * stats.f_frsize
    return None


def is_disk_full(error: BaseException, where: Optional[str | Path] = None) -> bool:
    """Whether ``error`` (or an exception it was raised from) means the file system is out of space or quota.
    ``where``: a path on that file system, for writers that drop the errno (checked for nearly no free space)."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        text = str(current).lower()
        if any(phrase in text or phrase.replace(" ", "") in text.replace(" ", "") for phrase in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    # only a writer that dropped the errno: an OSError with another errno (EACCES, EROFS, a pseudo file system such
    # as /proc refusing the write) is not a full disk, whatever statvfs says of that file system
    if where is not None and isinstance(error, (OSError, RuntimeError)) and getattr(error, "errno", None) is None:
        free = _free_bytes(Path(where))
        return free is not None and free < LOW_SPACE_BYTES
    return False


ADVICE = "Free some space or write to another disk, then run again"


def _disk_full(target: Path, error: BaseException, removed: Optional[Path], advice: str = ADVICE) -> DiskFullError:
    if isinstance(error, DiskFullError):
        return error
    message = f"the disk is full: no space left on the device while writing {str(target)!r}"
    if removed is not None:
        message += f" (the partial output {removed.name} was removed)"
    free = _free_bytes(target)
    if free is not None:
        message += f"; {free / 2 ** 20:.1f} MiB free now"
    full = DiskFullError(f"{message}. {advice} [{type(error).__name__}: {str(error)[:200]}]")
    full.errno = errno.ENOSPC
    return full


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def removed_on_failure(partial: str | Path, target: Optional[str | Path] = None,
                       advice: str = ADVICE) -> Iterator[None]:
    """Remove ``partial`` (a staging directory or temporary file) when the block fails; a failure caused by a full
    disk becomes a :class:`DiskFullError` naming ``target`` (default: ``partial``) and giving ``advice``."""
    partial = Path(partial)
    try:
        yield
    except BaseException as error:
        full = isinstance(error, Exception) and is_disk_full(error, partial)  # before removing frees space
        _remove(partial)
        if full:
            raise _disk_full(Path(target if target is not None else partial), error, partial, advice) from error
        raise


@contextlib.contextmanager
def reporting_disk_full(target: str | Path, advice: str = ADVICE) -> Iterator[None]:
    """A write to ``target`` without staging (e.g. appending a log line): a full disk becomes a
    :class:`DiskFullError` naming ``target``."""
    try:
        yield
    except Exception as error:
        if is_disk_full(error, target):
            raise _disk_full(Path(target), error, None, advice) from error
        raise _write_error(Path(target), error) from error


def _write_error(target: Path, error: BaseException) -> BaseException:
    """An operating-system refusal to write ``target`` (permission denied, a read-only or pseudo file system, a path
    through a file) as the user error it is, naming the output; any other error unchanged."""
    if isinstance(error, OSError) and not isinstance(error, DiskFullError) and error.errno is not None:
        return OutputWriteError(f"cannot write {str(target)!r}: {error.strerror or error} "
                                f"[{type(error).__name__}, errno {error.errno}]")
    return error


def make_directory(path: str | Path) -> Path:
    """``path`` and its parents as directories; a file on the way is an :class:`InvalidValueError` naming it."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise InvalidValueError(f"{str(part)!r} is a file, where a directory is needed for {str(path)!r}")
    with reporting_disk_full(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (a file or a directory) for the block: marks a write in progress."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


@contextlib.contextmanager
def exclusive_lock(path: str | Path, busy_message: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on the file ``path`` (created) for the block, or raise
    :class:`OutputExistsError` (``busy_message``, then the holder). The kernel releases it when the holder exits or
    is killed, so a lock is never stale; the pid, host and start time written into the file only name the holder."""
    import socket

    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "an unknown process"
            raise OutputExistsError(f"{busy_message} ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _partials_pattern(target: Path) -> re.Pattern:
    name = re.escape(target.name)
    return re.compile(rf"^\.{name}\.(?:(staging)-[a-z0-9_]+|(old)-[a-z0-9_]+|[a-z0-9_]{{8}}{re.escape(target.suffix)})$")


def remove_stale_partials(target: str | Path, target_locked: bool = False) -> list[Path]:
    """Remove the staging directories and temporary files of ``target`` (made by :func:`atomic_directory` and
    :func:`atomic_file`) that writers killed mid-write left beside it: those no live writer holds locked. An
    ``.old-`` directory (the previous version, between the two renames of a replacement) is kept while ``target``
    itself is missing: it is then the only copy. Returns what was removed.

    Entries younger than ``STALE_AFTER_S`` are kept (a writer may not have locked its new entry yet), except with
    ``target_locked``: the caller holds ``target``'s exclusive lock (:func:`atomic_directory`), which every writer of
    a staging directory of ``target`` holds before creating it, so an unlocked one is a dead writer's at any age (a
    rerun right after a kill removes it)."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern, removed, now = _partials_pattern(target), [], time.time()
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            directory = match.group(1, 2) != (None, None)  # a staging or old directory, not a temporary file
            if now - entry.lstat().st_mtime < STALE_AFTER_S and not (target_locked and directory):
                continue
            if match.group(2) == "old":
                if target.exists():
                    _remove(entry)
                    removed.append(entry)
                continue
            fd = os.open(entry, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            finally:
                os.close(fd)
            _remove(entry)
            removed.append(entry)
    return removed


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False) -> int:
    """The permissions a plain ``open()`` (``mkdir()`` for a directory) would give a new file: 0666 (0777) less the
    umask. ``tempfile`` creates its files 0600 and its directories 0700 whatever the umask; what is renamed into
    place gets this mode instead, so that others can read what the suite writes where the umask lets them."""
    return (0o777 if directory else 0o666) & ~_umask()


def give_plain_modes(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain ``open()`` / ``mkdir()``
    would: writers such as ``tempfile`` and safetensors create private files (0600) whatever the umask. Executable
    bits a file has are kept (as far as the umask allows); links are left alone."""
    path = Path(path)
    file_mode, dir_mode = plain_mode(), plain_mode(directory=True)
    for entry in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            os.chmod(entry, dir_mode)
        else:
            os.chmod(entry, file_mode | (entry.stat().st_mode & 0o111 & dir_mode))


@contextlib.contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a staging directory next to ``target``; on success it is renamed to ``target``.

    ``target`` must not exist or be an empty directory unless ``replace`` is true (then the old one is removed only
    after the new one is complete). Staging directories of ``target`` left by killed writers are removed first.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InvalidValueError(f"{str(target)!r} is a file, where a directory is to be written")
    make_directory(target.parent)
    with exclusive_lock(target.parent / f".{target.name}.lock",
                        f"{str(target)!r} is being written by another process; wait for it to finish or choose "
                        f"another output") as lock:
        try:
            with _staged_directory(target, replace) as staging:
                yield staging
        finally:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _staged_directory(target: Path, replace: bool) -> Iterator[Path]:
    remove_stale_partials(target, target_locked=True)  # called with the target's exclusive lock held
    if target.exists() and not replace and any(target.iterdir()):
        raise OutputExistsError(f"{str(target)!r} already exists and is not empty")
    with reporting_disk_full(target):
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    with removed_on_failure(staging, target), _held(staging):
        yield staging
        give_plain_modes(staging)
        if target.exists() and not replace and any(target.iterdir()):
            raise OutputExistsError(f"{str(target)!r} was written by another process meanwhile")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s directory; on success it replaces ``target``. Temporary files of
    ``target`` left by killed writers are removed first."""
    target = Path(target)
    if target.is_dir():
        raise InvalidValueError(f"{str(target)!r} is a directory, where a file is to be written")
    make_directory(target.parent)
    remove_stale_partials(target)
    with reporting_disk_full(target):
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    try:
        with removed_on_failure(name, target):
            fcntl.flock(handle, fcntl.LOCK_EX)  # held until the file is in place (writers reopen it by name)
            yield Path(name)
            give_plain_modes(name)  # the writer may have replaced the file by a private one of its own
            os.replace(name, target)
    finally:
        os.close(handle)


def write_text_atomically(target: str | Path, text: str) -> None:
    with atomic_file(target) as path:
        path.write_text(text)


def save_pretrained_atomically(model, output: str | Path) -> None:
    """``model.save_pretrained`` into a staging directory renamed to ``output`` (which must be absent or empty)."""
    with atomic_directory(output) as staging:
        model.save_pretrained(staging)


def allocated_memmap(path: str | Path, dtype, shape: tuple[int, ...]):
    """A new ``.npy`` memory map whose blocks are reserved on disk first. A sparse memory map that runs out of disk
    space while being filled kills the process with SIGBUS; reserving the space up front turns a full disk into an
    ``OSError`` (ENOSPC) at creation, which the staging around the write reports as :class:`DiskFullError`."""
    import numpy as np

    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = os.path.getsize(path)
    if size and hasattr(os, "posix_fallocate"):
        descriptor = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(descriptor, 0, size)
        except OSError as error:
            if error.errno in DISK_FULL_ERRNOS:
                raise
            # file systems without fallocate support (EOPNOTSUPP / EINVAL) keep the sparse file
        finally:
            os.close(descriptor)
    return array

