"""The study's journal file, kept loadable when a writer dies mid-record.

Optuna's journal is a file of JSON lines, each appended under a lock file. A writer that dies
mid-append (killed, out of space, its machine lost) leaves a torn last line. Optuna 5 skips a
torn last line when it reads, but the next append lands after it and fuses with it into one
bad line: the appending worker then misses its own record and crashes, and every later load
of the study fails. So :class:`SafeJournalFileBackend` cuts a torn last line off, under the
lock, when the journal is opened and before every append, keeping a copy of the journal as it
was and saying so in one warning line. The record lost is the one being written when the
writer died: its trial stays running until its heartbeat goes stale, then fails and its slot
is run again; no finished trial is touched. A line in the middle that is a torn record fused
with a whole one (written before this check, or by another client) is cut back to the whole one.
A lock file older than the lock's grace period (its writer was killed holding it) is released
at once, in the same line, rather than after Optuna has watched it for the grace period again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from ..safe_io import warn

__all__ = ["SafeJournalFileBackend", "JournalDamagedError", "repair_journal", "release_stale_lock"]

#: How every record Optuna writes begins (json.dumps of a dict whose first key is op_code).
_RECORD_START = b'{"op_code":'


class JournalDamagedError(ValueError):
    """A journal line that is neither a record nor a torn record fused with one."""


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _backup(path: Path) -> Path:
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while (backup := path.with_name(f"{path.name}.{stamp}{f'-{n}' if n else ''}.bak")).exists():
        n += 1
    shutil.copyfile(path, backup)
    return backup


def _whose(fragment: bytes) -> str:
    m = re.search(rb'"trial_id":(\d+)', fragment)
    return f" of a record of trial id {int(m.group(1))}" if m else ""


def repair_journal(path: str | os.PathLike) -> Optional[str]:
    """Make ``path`` a journal Optuna loads and appends to safely; returns what was done (a
    warning to print), or None when it was whole. Call it holding the journal's lock."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    if not data:
        return None
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the journal ends with a newline, as a whole one does
    kept, fused = [], []
    for number, line in enumerate(lines, 1):
        if _parses(line):
            kept.append(line)
            continue
        start = line.rfind(_RECORD_START)
        if start > 0 and _parses(line[start:]):
            kept.append(line[start:])
            fused.append(number)
            continue
        if not line.strip():  # an empty line holds no record: dropping it loses nothing
            fused.append(number)
            continue
        raise JournalDamagedError(f"{path}: line {number} is damaged and holds no whole record; the study "
                                  "cannot be loaded without it (restore a copy of the journal)")
    if not torn and not fused:
        return None
    if torn and not fused and _parses(torn):  # whole but for its newline: keep it
        with open(path, "ab") as f:
            f.write(b"\n")
        return None
    backup = _backup(path)
    if fused:
        tmp = path.with_name(f".{path.name}.repair{os.getpid()}")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
    else:  # only the tail: cut it in place, the whole lines before it keep their offsets
        os.truncate(path, len(data) - len(torn))
    what = []
    if torn:
        what.append(f"its last record is torn ({len(torn)} bytes{_whose(torn)}: a writer killed mid-write); "
                    "dropped it, and a trial it left running fails once its heartbeat stops and is run again")
    if fused:
        what.append(f"line(s) {', '.join(map(str, fused[:5]))} held a torn record before a whole one; kept the "
                    "whole records")
    return f"{path}: {'; '.join(what)} (the journal as it was: {backup.name})"


def release_stale_lock(lock_path: str | os.PathLike, grace_period: float) -> Optional[str]:
    """Remove the journal's lock file if it is older than ``grace_period`` seconds: a writer killed
    while holding it. (Optuna would too, but only after watching it ``grace_period`` more seconds,
    on every start.) Returns what was done, or None."""
    lock = Path(lock_path)
    try:
        age = time.time() - os.lstat(lock).st_mtime  # the link's own time, not its target's
    except OSError:
        return None
    if age <= grace_period:
        return None
    try:
        os.unlink(lock)
    except OSError:  # another worker released it first
        return None
    return f"released the lock a writer killed {age:.0f} s ago left ({lock.name})"


class SafeJournalFileBackend(JournalFileBackend):
    """Optuna's journal file with torn records cut off (see the module's text), under its lock."""

    def __init__(self, file_path: str, lock_obj=None) -> None:
        lock = lock_obj or JournalFileSymlinkLock(file_path)
        super().__init__(file_path, lock_obj=lock)
        self._path, self._repair_lock = Path(file_path), lock
        grace = getattr(lock, "grace_period", None)
        stale = release_stale_lock(str(file_path) + ".lock", grace) if grace else None
        self._locked(lambda: self._repair(stale))

    def _locked(self, fn) -> None:
        self._repair_lock.acquire()
        try:
            fn()
        finally:
            self._repair_lock.release()

    def _repair(self, stale: Optional[str] = None) -> None:
        message = repair_journal(self._path)
        if stale:  # one line for the one fault: a writer killed mid-write leaves both
            message = (message.replace(f"{self._path}: ", f"{self._path}: {stale}; ", 1) if message
                       else f"{self._path}: {stale}")
        if message:
            warn(message)

    def _tail_is_torn(self) -> bool:
        size = self._path.stat().st_size
        if not size:
            return False
        with open(self._path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) != b"\n"

    def append_logs(self, logs: list[dict]) -> None:
        # as Optuna's append_logs, but a torn tail another writer left is cut first: appended
        # after it, this record would fuse with it and be lost
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")

        def append() -> None:
            if self._tail_is_torn():
                self._repair()
            with open(self._path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        self._locked(append)
