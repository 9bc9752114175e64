"""Output files and folders of the headless route: atomic writes, writable checks, and the lock held
by the one run writing a folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..errors import MedSteerError
from .distributed import Shard

log = logging.getLogger("medsteer")


class OutputFolderError(MedSteerError):
    """An output folder holds results made with other settings."""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return f"{reason} ({Path(exc.filename).name})" if exc.filename else reason


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, what: str) -> None:
    """Create and delete a file where ``folder`` is (or its nearest existing ancestor), creating nothing."""
    import tempfile

    place = _nearest_existing(folder)
    if not place.is_dir():
        raise OutputFolderError(
            f"cannot write {what} {str(folder)!r}: {str(place)!r} is a file, not a folder: choose another path"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".medsteer-write-check-", dir=place)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write {what} {str(folder)!r}: {exc.strerror or exc} in {str(place)!r}: choose a writable "
            "folder (or fix its permissions, or free space)"
        ) from None


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check, before any model loads or sampling, that the file ``path`` can be written.

    Creates nothing: a file is created and deleted in the nearest existing folder above ``path``.

    Raises:
        OutputFolderError: ``path`` is a folder, or its folder cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputFolderError(f"{flag} {str(path)!r} is a folder: give a file name, e.g. {str(path / 'out')!r}")
    _check_writable_folder(path.parent, f"{flag} file {str(path)!r} into the folder")
    return path


# -------------------------------------------------------------------------------- folder lock
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_LOCK = ".medsteer.lock"  # held by the one run writing a folder; removed when that run ends
_HELD: dict[str, list] = {}  # realpath -> [fd, depth, created]: this process's locks (reentrant)


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _acquire(out_dir: Path) -> None:
    key = os.path.realpath(out_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    place = _nearest_existing(out_dir)
    if not place.is_dir():
        raise OutputFolderError(
            f"cannot write the output folder {str(out_dir)!r}: {str(place)!r} is a file, not a folder: choose "
            "another --out"
        )
    created = not out_dir.exists()
    path = out_dir / _LOCK
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise OutputFolderError(
                    f"{str(out_dir)!r} is being written by another medsteer run{_lock_holder(path)}: wait for it "
                    "to finish (then rerun to add missing pairs), or pass another --out folder"
                )
            try:  # the file we locked is still the folder's lock (its previous holder removes it)
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise OutputFolderError(f"cannot lock {str(out_dir)!r}: its lock file keeps changing; retry")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write to the output folder {str(out_dir)!r}: {_os_reason(exc)}: choose a writable --out "
            "folder (or fix its permissions, or free space)"
        ) from None
    _HELD[key] = [fd, 1, created]


def _release(out_dir: Path) -> None:
    key = os.path.realpath(out_dir)
    held = _HELD[key]
    held[1] -= 1
    if held[1]:
        return
    del _HELD[key]
    fd, _, created = held
    try:
        (out_dir / _LOCK).unlink()  # while still locked: a waiting run then sees a new file
        if created:
            out_dir.rmdir()  # only succeeds when this run wrote nothing (it failed before writing)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_output_folder(out_dir: str | os.PathLike, shard: Shard | None = None):
    """Hold ``out_dir`` (created if missing) for this run: a second writer is refused at once.

    An exclusive, non-blocking lock on ``out_dir/.medsteer.lock`` (``flock``; released by the OS
    when the process ends, even if it is killed). Under torchrun rank 0 holds it for all ranks.
    Reentrant within one process. On exit the lock file is removed, and a folder this call
    created is removed again if the run left it empty.

    Raises:
        OutputFolderError: another run holds the folder, or it cannot be written.
    """
    shard = shard or Shard()
    out_dir = Path(out_dir)
    error: str | None = None
    if shard.main:
        try:
            _acquire(out_dir)
        except OutputFolderError as exc:
            error = str(exc)
    first = shard.gather(error)[0]
    if first is not None:
        raise OutputFolderError(first)
    try:
        yield out_dir
    finally:
        if shard.main:
            _release(out_dir)
