"""Files a run of days can trust: atomic, checksummed writes; a previous good copy; faults as one line.

Killing a process mid-save is not the only way a run loses a file: a full disk, a bad disk,
or a truncated copy moved between machines damage checkpoints too. So every file a run writes
goes to a temporary file beside it, is flushed to the disk and renamed into place, and a
checkpoint's SHA-256 goes beside it (``last.pth.sha256``, in ``sha256sum`` format, so
``sha256sum -c`` checks it by hand). ``keep_previous`` first renames the current file to
``last.prev.pth`` (with its checksum) when it is intact, so that one good copy survives
whatever happens to the newest. A load verifies the checksum and turns an unreadable file
into :class:`DamagedFileError`; a write that runs out of space leaves the old file as it was
and raises :class:`DiskFullError`, whose text names the path and the space to free.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

__all__ = ["DamagedFileError", "DiskFullError", "OutputError", "write_file", "write_text", "save_torch",
           "load_torch", "verify", "checksum_path", "previous_path", "check_output_dir", "is_write_fault",
           "write_fault_text", "warn", "set_program"]

#: The errors that mean "no room": the disk is full, or the user's quota is.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: The errors a user fixes on their side of a write: room, permissions, a read-only mount.
WRITE_FAULTS = (*NO_SPACE, errno.EROFS, errno.EACCES, errno.EPERM)

_program = "train_dcl.py"


def set_program(name: str) -> None:
    """The script name that starts :func:`warn`'s lines (train_dcl.py, search_dcl.py)."""
    global _program
    _program = name


def warn(message: str) -> None:
    """One line on stderr, ``<script>: warning: <message>``, from the first process of a launch only."""
    if os.environ.get("RANK", "0") != "0":  # every DDP rank reads the same files: one warning is enough
        return
    print(f"{_program}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


class DamagedFileError(ValueError):
    """A file that is there but cannot be trusted: its checksum differs, or it does not load."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged ({reason})")


class OutputError(ValueError):
    """A run folder that cannot be created or written (bad input: one line, exit 2)."""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _free_bytes(path: Path) -> Optional[int]:
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


class DiskFullError(OSError):
    """A write that found no room; the file it was to replace is untouched."""

    def __init__(self, path: str | os.PathLike, needed: Optional[int] = None):
        self.path, self.needed = Path(path), needed
        free = _free_bytes(self.path.parent)
        self.free = free
        have = f", {_human(free)} free" if free is not None else ""
        if needed and free is not None and needed > free:
            what = f"free at least {_human(needed - free)} there (it needs about {_human(needed)}{have})"
        elif needed:
            what = f"free space there (it needs about {_human(needed)}{have})"
        else:
            what = f"free space there{' (' + have[2:] + ')' if have else ''}"
        self.text = (f"no space left on the device for {self.path}: {what}, e.g. old runs, or move the "
                     "run to a larger disk")
        super().__init__(errno.ENOSPC, self.text, str(self.path))

    def __str__(self) -> str:
        return self.text


def is_write_fault(e: BaseException) -> bool:
    """An OSError of a write the user can fix (no space, no permission, read-only)."""
    return isinstance(e, OSError) and e.errno in WRITE_FAULTS


def write_fault_text(e: OSError, where: str | os.PathLike | None = None) -> str:
    """The one line of a write fault: what, where, and (no space) what to free."""
    if isinstance(e, DiskFullError):
        return str(e)
    path = e.filename or where
    if e.errno in NO_SPACE:
        return str(DiskFullError(path or ".", None))
    if e.errno == errno.EROFS:
        return f"cannot write {path}: the file system is read-only"
    return f"{path}: {(e.strerror or str(e)).lower()}"  # no permission: for a read as much as a write


def checksum_path(path: str | os.PathLike) -> Path:
    """``last.pth`` → ``last.pth.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def previous_path(path: str | os.PathLike) -> Path:
    """``last.pth`` → ``last.prev.pth``: the copy ``keep_previous`` keeps."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class _Writer:
    """A binary file that hashes what goes through it and keeps the OSError of a failed write
    (torch.save turns it into a RuntimeError without the errno)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.written, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(data)
        self.written += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the renames still happened
        pass
    finally:
        os.close(fd)


def _unlink(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def verify(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` cannot be trusted, or None: missing, or its SHA-256 differs from its
    ``.sha256`` file. A file without a checksum file (an older run's) passes: its load tells."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    sums = checksum_path(path)
    if not sums.is_file():
        return None
    try:
        recorded = sums.read_text().split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        return f"its checksum file {sums.name} is unreadable"
    if _sha256(path) != recorded:
        return f"{path.stat().st_size} bytes whose SHA-256 differs from the one {sums.name} recorded"
    return None


def _rotate(path: Path) -> None:
    """Make the current ``path`` the previous copy, unless it is damaged: then the previous copy
    stays the older good one."""
    if not path.is_file() or verify(path) is not None:
        return
    prev, sums = previous_path(path), checksum_path(path)
    _unlink(checksum_path(prev))  # a crash below must not pair the old checksum with the new file
    os.replace(path, prev)
    if sums.is_file():
        # the same digest, under the name the file has now (what `sha256sum -c` opens)
        tmp = prev.with_name(f".{prev.name}.sha256.tmp{os.getpid()}")
        try:
            tmp.write_text(f"{sums.read_text().split()[0]}  {prev.name}\n")
            os.replace(tmp, checksum_path(prev))
        except OSError:  # no room even for this: the previous copy stays, unverified (its load tells)
            _unlink(tmp)
        _unlink(sums)


def write_file(path: str | os.PathLike, fill: Callable[[Any], None], *, checksum: bool = False,
               keep_previous: bool = False) -> None:
    """Write ``path`` through ``fill(f)`` (f: a binary file) atomically.

    ``checksum``: its SHA-256 goes to ``<path>.sha256``. ``keep_previous``: the current file,
    if intact, becomes ``previous_path(path)`` first. Out of space: :class:`DiskFullError`,
    ``path`` (and its previous copy) untouched, no temporary file left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    sums_tmp = path.with_name(f".{path.name}.sha256.tmp{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                fill(writer)
            except Exception:
                if writer.error is not None:  # the write's own error, not the serialiser's rewording
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename makes it the file
        if checksum:
            with open(sums_tmp, "w") as f:
                f.write(f"{writer.sha.hexdigest()}  {path.name}\n")
                f.flush()
                os.fsync(f.fileno())
    except BaseException as e:
        _unlink(tmp, sums_tmp)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            old = path.stat().st_size if path.is_file() else 0
            raise DiskFullError(path, max(old, writer.written if writer else 0) or None) from None
        raise
    if keep_previous:
        _rotate(path)
    else:
        _unlink(checksum_path(path))  # never an old checksum beside the new file
    os.replace(tmp, path)
    if checksum:
        os.replace(sums_tmp, checksum_path(path))
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path.write_text(text)``, atomically: a reader never sees half of it, a full disk leaves the old."""
    data = text.encode("utf-8")
    write_file(path, lambda f: f.write(data))


def save_torch(obj: Any, path: str | os.PathLike, *, keep_previous: bool = False) -> None:
    """``torch.save`` atomically, with a checksum (and the previous copy kept, if asked)."""
    import torch

    write_file(path, lambda f: torch.save(obj, f), checksum=True, keep_previous=keep_previous)


def load_torch(path: str | os.PathLike, *, weights_only: bool) -> Any:
    """``torch.load`` of a verified file; a damaged one is :class:`DamagedFileError`, not a stack."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    reason = verify(path)
    if reason == "missing":
        raise FileNotFoundError(f"{path} does not exist")
    if reason is not None:
        raise DamagedFileError(path, reason)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DamagedFileError(path, f"not a readable PyTorch file: {first}") from None


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> None:
    """Create the run folder ``path`` and prove it writable, or say in one line why not.

    Run before the data loads, so that a folder a run cannot use costs no time.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise OutputError(f"{flag} {path}: cannot create the run folder: {blocker} is a file, not a folder") from None
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create the run folder: {_reason(e)}") from None
    for sub in ("checkpoints", "nodes"):
        if (path / sub).exists() and not (path / sub).is_dir():
            raise OutputError(f"{flag} {path}: {path / sub} is a file, not a folder")
    probe = path / f".write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write into the run folder: {_reason(e)}") from None
    finally:
        _unlink(probe)


def _reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "the file system is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "no permission"
    if e.errno in NO_SPACE:
        return "no space left on the device"
    return e.strerror or str(e)
