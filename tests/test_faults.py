"""Faults a long run meets, each injected for real: damaged checkpoints, an output folder that cannot
be written, a full disk, a torn metrics line, a torn journal record, a killed search worker, a
report run whose checkpoint is damaged.

Each test asserts the one line the fault gives, the exit status, and that nothing finished is lost:
where a resume follows, its metrics and weights equal those of the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

import search_dcl
import train_dcl
from timm_dcl import run_files, safe_io
from timm_dcl.run_state import NoUsableCheckpointError, load_run_checkpoint
from timm_dcl.safe_io import DamagedFileError, verify
from timm_dcl.trainer import GraphTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)
TINY = ["--train-subset", "64", "--eval-subset", "32", "--batch-size", "32", "--workers", "0", "--no-progress",
        "--seed", "5"]


def graph_args(cifar10: str) -> list[str]:
    return ["--node-models", "resnet20,resnet20", "--model-kwargs", "all:depth=8", "--dataset", "cifar10",
            "--data-dir", cifar10]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cifar10) -> Path:
    """The uninterrupted run every resume below is compared with: two epochs."""
    tmp = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIMM_DCL_CACHE", str(tmp / "cache"))
        assert train_dcl.main([*graph_args(cifar10), "--epochs", "2", *TINY, "--output", str(tmp / "run")]) == 0
    return tmp / "run"


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock times (every line must parse: none is torn)."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> list[dict]:
    return [torch.load(run / "nodes" / f"node{i}_resnet20.pth", weights_only=True)["state_dict"] for i in (0, 1)]


def assert_same_as(run: Path, straight: Path) -> None:
    """Nothing finished was lost: the metrics and the final weights equal the uninterrupted run's."""
    assert _metrics(run) == _metrics(straight)
    for ours, theirs in zip(_weights(run), _weights(straight)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_run_checkpoint(run / "checkpoints" / "last.pth")["epoch"] == 2
    assert verify(run / "checkpoints" / "last.pth") is None


def one_line(err: str, kind: str, prog: str = "train_dcl.py") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines  # one line: no traceback, no second message
    assert lines[0].startswith(f"{prog}: {kind}: "), lines[0]
    return lines[0]


def _copy(run: Path, tmp: Path) -> Path:
    """A copy of a finished run with its final outputs removed, so that a resume must remake them."""
    out = shutil.copytree(run, tmp / "run")
    shutil.rmtree(out / "nodes")
    (out / "summary.json").unlink()
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    """One byte changed in the middle (inside a tensor's data: torch.load alone would not notice)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "one byte changed": _flip, "missing": Path.unlink}


# ---------------------------------------------------------------------------------- checkpoints


def test_every_checkpoint_keeps_the_previous_one_and_a_checksum(straight):
    ckpt = straight / "checkpoints"
    assert load_run_checkpoint(ckpt / "last.pth")["epoch"] == 2
    assert load_run_checkpoint(ckpt / "last.prev.pth")["epoch"] == 1
    for name in ("last.pth", "last.prev.pth", "best.pth", "../nodes/node0_resnet20.pth"):
        path = ckpt / name
        sums = (ckpt / f"{name}.sha256").read_text().split()
        assert sums[1] == path.name and verify(path) is None  # sha256sum -c reads it, from its folder
    # sha256sum itself agrees, where it is installed
    if shutil.which("sha256sum"):
        proc = subprocess.run(["sha256sum", "-c", "last.pth.sha256", "last.prev.pth.sha256"], cwd=ckpt,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(ckpt.glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_last_checkpoint_resumes_from_the_previous_one(damage, straight, tmp_path, capsys):
    run = _copy(straight, tmp_path)
    last = run / "checkpoints" / "last.pth"
    DAMAGE[damage](last)
    capsys.readouterr()
    assert train_dcl.main(["--resume", str(run), "--epochs", "2", *TINY]) == 0
    captured = capsys.readouterr()
    line = one_line(captured.err, "warning")
    assert line.startswith(f"train_dcl.py: warning: {last} is {'missing' if damage == 'missing' else 'damaged ('}")
    assert line.endswith("; resuming from last.prev.pth at epoch 1")
    assert "epoch   2/2" in captured.out  # the lost epoch was trained again
    assert_same_as(run, straight)


def test_no_usable_checkpoint_is_one_error_line(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path)
    _truncate(run / "checkpoints" / "last.pth")
    _flip(run / "checkpoints" / "last.prev.pth")
    capsys.readouterr()
    assert train_dcl.main(["--resume", str(run), "--epochs", "3", *TINY]) == 2
    line = one_line(capsys.readouterr().err, "error")
    assert f"--resume {run}: no usable checkpoint: {run}/checkpoints/last.pth is damaged (" in line
    assert f"{run}/checkpoints/last.prev.pth is damaged (" in line
    assert len(_metrics(run)) == 2  # the run's files are left as they were


def test_best_and_node_files_are_verified_when_loaded(straight, tmp_path, cifar10, capsys):
    best = Path(shutil.copy(straight / "checkpoints" / "best.pth", tmp_path / "best.pth"))
    shutil.copy(straight / "checkpoints" / "best.pth.sha256", tmp_path / "best.pth.sha256")
    assert load_run_checkpoint(best)["format"] == "timm_dcl.train.v1"
    _flip(best)
    with pytest.raises(DamagedFileError, match=r"best\.pth is damaged \(.*SHA-256 differs"):
        load_run_checkpoint(best)
    # a damaged node file as a frozen teacher: one line, before any data loads
    teacher = Path(shutil.copy(straight / "nodes" / "node1_resnet20.pth", tmp_path / "teacher.pth"))
    shutil.copy(straight / "nodes" / "node1_resnet20.pth.sha256", tmp_path / "teacher.pth.sha256")
    for damage, reason in ((_flip, "SHA-256 differs"), (_truncate, "SHA-256 differs")):
        damage(teacher)
        capsys.readouterr()
        assert train_dcl.main([*graph_args(cifar10), "--preset", "kd", "--checkpoints", f",{teacher}",
                               "--epochs", "1", *TINY, "--output", str(tmp_path / "kd")]) == 2
        line = one_line(capsys.readouterr().err, "error")
        assert f"node 1 (resnet20): checkpoint {teacher} is damaged (" in line and reason in line
    # without its checksum file (a copy that lost it), the load itself tells: one line, not PyTorch's stack
    (tmp_path / "teacher.pth.sha256").unlink()
    assert train_dcl.main([*graph_args(cifar10), "--preset", "kd", "--checkpoints", f",{teacher}",
                           "--epochs", "1", *TINY, "--output", str(tmp_path / "kd")]) == 2
    line = one_line(capsys.readouterr().err, "error")
    assert f"{teacher} is damaged (not a readable PyTorch file: " in line
    assert not (tmp_path / "kd" / "metrics.jsonl").exists()


def test_a_torn_metrics_line_is_dropped_by_the_resume(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path)
    # the state after epoch 1: its checkpoint, and metrics.jsonl with a torn second line
    shutil.copy(run / "checkpoints" / "last.prev.pth", run / "checkpoints" / "last.pth")
    shutil.copy(run / "checkpoints" / "last.prev.pth.sha256", run / "checkpoints" / "last.pth.sha256")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    capsys.readouterr()
    assert train_dcl.main(["--resume", str(run), "--epochs", "2", *TINY]) == 0
    assert capsys.readouterr().err == ""
    assert_same_as(run, straight)


def test_a_damaged_run_config_is_one_error_line(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path)
    (run / "config.yaml").write_text("node_models: [resnet20,\n")  # cut off mid-list
    capsys.readouterr()
    assert train_dcl.main(["--resume", str(run), "--epochs", "2", *TINY]) == 2
    line = one_line(capsys.readouterr().err, "error")
    assert line.startswith(f"train_dcl.py: error: --resume {run}: {run}/config.yaml is damaged (")


# ---------------------------------------------------------------------------- output and disk


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the run gets as far as loading its data."""
    def load(self):
        raise AssertionError("the data was loaded before the output folder was checked")
    monkeypatch.setattr(GraphTrainer, "_load_data", load)


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A small file system of its own at ``where`` (root only); skips the test where mounting is refused."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small file system needs root (CI runs as root)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("layout", ["a file where a folder should be", "the output is a file",
                                    "checkpoints is a file"])
def test_an_output_in_the_way_of_a_file_is_one_line(layout, tmp_path, cifar10, capsys, no_data):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    output = {"a file where a folder should be": blocker / "run", "the output is a file": blocker,
              "checkpoints is a file": tmp_path / "run"}[layout]
    if layout == "checkpoints is a file":
        output.mkdir()
        blocker = output / "checkpoints"
        blocker.write_text("not a folder\n")
    assert train_dcl.main([*graph_args(cifar10), "--epochs", "1", *TINY, "--output", str(output)]) == 2
    line = one_line(capsys.readouterr().err, "error")
    assert line.startswith(f"train_dcl.py: error: --output {output}: ") and f"{blocker} is a file, not a folder" in line


def test_a_read_only_output_is_one_line(tmp_path, cifar10, capsys, no_data):
    disk = tmp_path / "disk"
    if os.geteuid() != 0:  # a folder without write permission (root writes through permissions)
        disk.mkdir()
        (disk / "run").mkdir()
        disk.chmod(0o555)
        (disk / "run").chmod(0o555)
        cases = {disk / "run": "cannot write into the run folder: no permission",
                 disk / "new": "cannot create the run folder: no permission"}
        mounted = contextlib.nullcontext()
    else:  # a read-only file system holding a run folder
        mounted = tmpfs(disk, "size=1m")
        cases = {disk / "run": "cannot write into the run folder: the file system is read-only",
                 disk / "new": "cannot create the run folder: the file system is read-only"}
    with mounted:
        if os.geteuid() == 0:
            (disk / "run").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for output, reason in cases.items():
            assert train_dcl.main([*graph_args(cifar10), "--epochs", "1", *TINY, "--output", str(output)]) == 2
            assert one_line(capsys.readouterr().err, "error") == f"train_dcl.py: error: --output {output}: {reason}"


def test_a_search_output_in_the_way_of_a_file_is_one_line(tmp_path, cifar10, capsys):
    (tmp_path / "blocker").write_text("not a folder\n")
    assert search_dcl.main(search_args(cifar10, tmp_path / "blocker" / "out", "--n-trials", "1")) == 2
    line = one_line(capsys.readouterr().err, "error", "search_dcl.py")
    assert f"{tmp_path / 'blocker'}" in line and "Not a directory" in line


class _FullDisk:
    """A file whose disk fills ``room`` bytes in: the write after that stores part and fails with ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _resume_equals_straight(run: Path, straight: Path, capsys) -> None:
    capsys.readouterr()
    assert train_dcl.main(["--resume", str(run), "--epochs", "2", *TINY]) == 0
    assert capsys.readouterr().err == ""
    assert_same_as(run, straight)


def _after_a_full_disk(run: Path, line: str) -> None:
    """What the run left: the one line, epoch 1's checkpoint intact, whole metrics, no temporary file."""
    last = run / "checkpoints" / "last.pth"
    assert line.startswith(f"train_dcl.py: error: no space left on the device for {last}: free ")
    assert line.endswith(f"; the last good checkpoint is kept: continue with --resume {run}")
    assert load_run_checkpoint(last)["epoch"] == 1 and verify(last) is None
    assert [r["epoch"] for r in _metrics(run)] == [1]
    assert not [p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name]


def test_no_space_mid_run_keeps_the_last_checkpoint(straight, tmp_path, cifar10, capsys, monkeypatch):
    """Always run: the disk fills while epoch 2's checkpoint is written (ENOSPC from the file's write)."""
    from timm_dcl import run_state

    real_save, real_init = run_state.save_torch, safe_io._Writer.__init__
    saves = []

    def save_torch(obj, path, **kwargs):
        saves.append(Path(path).name)
        full = saves.count("last.pth") == 2

        def init(self, f):
            real_init(self, _FullDisk(f, 4096) if full else f)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(safe_io._Writer, "__init__", init)
            real_save(obj, path, **kwargs)

    monkeypatch.setattr(run_state, "save_torch", save_torch)
    run = tmp_path / "run"
    capsys.readouterr()
    assert train_dcl.main([*graph_args(cifar10), "--epochs", "2", *TINY, "--output", str(run)]) == 2
    _after_a_full_disk(run, one_line(capsys.readouterr().err, "error"))
    monkeypatch.undo()
    _resume_equals_straight(run, straight, capsys)


def test_a_small_full_file_system(straight, tmp_path, cifar10, capsys, monkeypatch):
    """A real full disk: a 16 MB tmpfs, filled up after epoch 1; freed, the run resumes."""
    with tmpfs(tmp_path / "disk", "size=16m") as disk:
        run, filler = disk / "run", disk / "filler"
        real_append = run_files.append_metrics

        def append_then_fill(output, record, history, labels):
            real_append(output, record, history, labels)
            if record["epoch"] == 1:  # another process takes the rest of the disk
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                os.truncate(filler, filler.stat().st_size - (64 << 10))  # 64 KB left: less than a checkpoint

        monkeypatch.setattr(run_files, "append_metrics", append_then_fill)
        capsys.readouterr()
        assert train_dcl.main([*graph_args(cifar10), "--epochs", "2", *TINY, "--output", str(run)]) == 2
        line = one_line(capsys.readouterr().err, "error")
        _after_a_full_disk(run, line)
        assert "free at least" in line and "MB" in line
        monkeypatch.undo()
        filler.unlink()
        _resume_equals_straight(run, straight, capsys)


def test_other_write_faults_are_one_line_too():
    """A folder made read-only, or its permission taken, mid-run: the one line main() prints."""
    from timm_dcl.safe_io import is_write_fault, write_fault_text

    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x/metrics.jsonl")
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/x/curves.png")
    assert all(is_write_fault(e) for e in (ro, denied)) and not is_write_fault(OSError(errno.EIO, "I/O error"))
    assert write_fault_text(ro) == "cannot write /runs/x/metrics.jsonl: the file system is read-only"
    assert write_fault_text(denied) == "/runs/x/curves.png: permission denied"
    assert write_fault_text(OSError(errno.ENOSPC, "No space left on device"), "/nonexistent/run").startswith(
        "no space left on the device for /nonexistent/run: free space there")


def test_a_full_disk_under_a_report_is_one_line(tmp_path, cifar10, capsys, monkeypatch):
    import timm_dcl.search
    from timm_dcl.safe_io import DiskFullError
    from timm_dcl.search import open_storage

    out = tmp_path / "out"
    optuna.create_study(storage=open_storage(None, out / "study.journal"), study_name=STUDY, direction="maximize")
    path = out / "report" / "g" / "seed0" / "checkpoints" / "last.pth"

    def run_report(*args, **kwargs):
        raise DiskFullError(path, 5_000_000)

    monkeypatch.setattr(timm_dcl.search, "run_report", run_report)
    capsys.readouterr()
    assert search_dcl.main(search_args(cifar10, out, "--report")) == 2
    line = one_line(capsys.readouterr().err, "error", "search_dcl.py")
    assert line.startswith(f"search_dcl.py: error: no space left on the device for {path}: free")
    assert line.endswith("; run the same command again once there is room: finished runs are kept")


# ------------------------------------------------------------------------------------ the study


def search_args(cifar10: str, output: Path, *extra: str) -> list[str]:
    """A search small enough for two busy CPU cores: 2 resnet20 nodes, two batches, 20 validation images."""
    return ["--num-nodes", "2", "--target-model", "resnet20", "--candidates", "resnet20", "--dataset", "cifar10",
            "--data-dir", cifar10, "--train-subset", "60", "--val-size", "20", "--eval-subset", "10",
            "--batch-size", "30", "--workers", "0", "--no-progress", "--poll-interval", "0.2", "--epochs", "1",
            "--heartbeat-interval", "1", "--grace-period", "2", "--output", str(output), *extra]


STUDY = "ktg-cifar10-2nodes"


def load(output: Path) -> optuna.Study:
    """The study as plain Optuna reads it (fails on a journal a torn record broke)."""
    storage = JournalStorage(JournalFileBackend(str(output / "study.journal")))
    return optuna.load_study(study_name=STUDY, storage=storage)


def finished(study: optuna.Study) -> dict:
    return {t.number: (t.state, t.value, t.params) for t in study.get_trials()
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


def _torn_warning(err: str, journal: Path) -> str:
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    line = warnings[0]
    assert line.startswith(f"search_dcl.py: warning: {journal}: ") and "its last record is torn (" in line
    assert "(the journal as it was: " in line
    backup = journal.with_name(line.rsplit("(the journal as it was: ", 1)[1].rstrip(")"))
    assert backup.is_file()
    return line


def _quick_study(path: Path, n: int = 3) -> optuna.Study:
    """A study of ``n`` finished trials in the journal at ``path``, through the search's storage."""
    from timm_dcl.search import open_storage, open_study

    study = open_study(open_storage(None, path), "s", {})
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=n)
    return study


def _values(path: Path) -> dict:
    study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    return {t.number: (t.state, t.value) for t in study.get_trials()}


@pytest.fixture
def search_program(monkeypatch):
    """Warnings are search_dcl.py's, as when search_dcl.py runs (these tests call the library)."""
    monkeypatch.setattr(safe_io, "_program", "search_dcl.py")


def test_a_torn_tail_left_by_another_writer_is_cut_before_the_next_append(tmp_path, capsys, search_program):
    """A live worker's next record does not fuse with the torn one a killed worker left."""
    journal = tmp_path / "s.journal"
    study = _quick_study(journal)
    before = _values(journal)
    with open(journal, "ab") as f:
        f.write(b'{"op_code":6,"worker_id":"dead","trial_id":9,"sta')
    capsys.readouterr()
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)  # the same storage, open all along
    line = one_line(capsys.readouterr().err, "warning", "search_dcl.py")
    assert f"{journal}: its last record is torn (" in line and "record of trial id 9" in line
    after = _values(journal)  # plain Optuna loads it: no fused line
    assert len(after) == 5 and {n: after[n] for n in before} == before


def test_a_record_whole_but_for_its_newline_is_kept(tmp_path, capsys):
    journal = tmp_path / "s.journal"
    _quick_study(journal, 2)
    data = journal.read_bytes()
    journal.write_bytes(data[:-1])  # the last trial's end, written but for its newline
    capsys.readouterr()
    from timm_dcl.search import open_storage
    open_storage(None, journal)
    assert capsys.readouterr().err == "" and journal.read_bytes() == data
    assert [state for state, _ in _values(journal).values()] == [TrialState.COMPLETE] * 2


def test_a_torn_record_fused_with_a_whole_one_is_cut_back(tmp_path, capsys):
    """A journal an older writer broke: a torn record with the next whole one appended after it."""
    from timm_dcl.search import StorageError, open_storage

    journal = tmp_path / "s.journal"
    _quick_study(journal)
    before = _values(journal)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]) + b'{"op_code":5,"worker_id":"dead","tri' + b"".join(lines[3:]))
    capsys.readouterr()
    open_storage(None, journal)
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "line(s) 4 held a torn record before a whole one" in line
    assert _values(journal) == before
    # a line that holds no record at all cannot be guessed: one error, the journal untouched
    damaged = b"".join(lines[:3]) + b"garbage\n" + b"".join(lines[3:])
    journal.write_bytes(damaged)
    with pytest.raises(StorageError, match=r"s\.journal: line 4 is damaged and holds no whole record"):
        open_storage(None, journal)
    assert journal.read_bytes() == damaged


def test_the_lock_a_killed_writer_left_is_released_at_once(tmp_path, capsys):
    from timm_dcl.search import open_storage

    journal = tmp_path / "s.journal"
    _quick_study(journal, 1)
    lock = tmp_path / "s.journal.lock"
    os.symlink(journal, lock)  # a live writer's: younger than the grace period, left alone
    from timm_dcl.search.journal import release_stale_lock
    assert release_stale_lock(lock, 30) is None and os.path.lexists(lock)
    os.utime(lock, (time.time() - 120,) * 2, follow_symlinks=False)  # its writer was killed two minutes ago
    capsys.readouterr()
    start = time.perf_counter()
    open_storage(None, journal)
    assert time.perf_counter() - start < 10  # Optuna alone watches it 30 s more
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "released the lock a writer killed 120 s ago left (s.journal.lock)" in line
    assert not os.path.lexists(lock)


def test_a_torn_last_journal_record(tmp_path, cifar10, capsys):
    out = tmp_path / "out"
    assert search_dcl.main(search_args(cifar10, out, "--n-trials", "2")) == 0
    before = finished(load(out))
    journal = out / "study.journal"
    data = journal.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    record = json.loads(data[start:])
    assert record["op_code"] == 6  # a finished search ends with its last trial's end (state and value)
    torn = record["trial_id"]  # one study in the journal: trial ids are trial numbers
    assert torn in before
    journal.write_bytes(data[: data.index(b'"state"', start)])  # written up to its trial id, no further
    capsys.readouterr()
    assert search_dcl.main(search_args(cifar10, out, "--n-trials", "2")) == 0
    line = _torn_warning(capsys.readouterr().err, journal)
    assert f"record of trial id {torn}" in line
    study = load(out)
    # the trial whose end was torn is failed (its heartbeat stopped) and its slot run again; the rest is kept
    assert study.trials[torn].state == TrialState.FAIL
    after = finished(study)
    assert len(after) == 2 and {n: after[n] for n in before if n != torn} == {n: v for n, v in before.items()
                                                                            if n != torn}


def test_a_worker_killed_mid_write(tmp_path, cifar10, capsys):
    """A real SIGKILL mid-trial, its last record torn as a kill mid-append leaves it: the next worker
    says so in one line, fails the dead trial and runs its slot again; the finished trial is kept."""
    out = tmp_path / "out"
    args = search_args(cifar10, out, "--n-trials", "2", "--epochs", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    victim = subprocess.Popen([sys.executable, str(REPO_ROOT / "search_dcl.py"), *args], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal, running, deadline = out / "study.journal", None, time.time() + 240
    try:
        while running is None and time.time() < deadline and victim.poll() is None:
            time.sleep(0.1)
            if journal.is_file() and journal.stat().st_size:
                try:
                    study = load(out)
                except KeyError:  # not created yet
                    continue
                # mid-trial, after a first trial finished: the second one running, its first epoch not reported
                if finished(study):
                    running = next((t for t in study.get_trials() if t.state == TrialState.RUNNING and t.params
                                    and not t.intermediate_values), None)
        assert running is not None, "the worker never got to its second trial"
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    before = finished(load(out))
    record = json.dumps({"op_code": 6, "worker_id": "killed", "trial_id": running._trial_id, "state": 1,
                         "values": [55.0]}, separators=(",", ":")).encode()
    with open(journal, "ab") as f:  # the kill landed mid-append: the record written up to its trial id
        f.write(record[: record.index(b'"state"')])
    # mid-append it held the journal's lock: the next worker starts a minute later
    lock = journal.with_name(journal.name + ".lock")
    if not os.path.lexists(lock):
        os.symlink(journal, lock)
    os.utime(lock, (time.time() - 60,) * 2, follow_symlinks=False)
    capsys.readouterr()
    start = time.perf_counter()
    assert search_dcl.main(args) == 0
    line = _torn_warning(capsys.readouterr().err, journal)
    assert f"record of trial id {running._trial_id}" in line
    assert f"released the lock a writer killed 60 s ago left ({lock.name})" in line
    assert not os.path.lexists(lock)
    assert time.perf_counter() - start < 30  # not Optuna's 30 s watch of a dead writer's lock
    study = load(out)
    assert study.trials[running.number].state == TrialState.FAIL
    after = finished(study)
    assert len(after) == 2 and {n: after[n] for n in before} == before


# ------------------------------------------------------------------------------- the report


def test_a_report_run_with_a_damaged_checkpoint_resumes_from_the_previous_one(tmp_path, cifar10, capsys,
                                                                              search_program):
    from timm_dcl.config import TrainConfig
    from timm_dcl.search import ReportSettings, SearchSpace, open_storage, open_study, run_report
    from timm_dcl.trainer import build_run_data, train_graph

    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    study = open_study(open_storage(None, tmp_path / "study.journal"), "s", {})
    params = next(b.params for b in space.baselines() if b.name == "dml")  # as a finished trial of the search
    study.enqueue_trial(params)
    trial = study.ask()
    space.sample(trial)
    trial.set_user_attr("graph", space.canonical(trial.params).key)
    study.tell(trial, 50.0)
    cfg = TrainConfig(dataset="cifar10", data_dir=cifar10, epochs=3, train_subset=64, eval_subset=32, batch_size=32,
                      workers=0, val_size=20, eval_split="val", seed=5, progress_bar=False)
    report_cfg = dict(load_data=lambda: build_run_data(cfg, space.input_model, val_size=0), baselines=False,
                      say=lambda m: None)

    # the same run, uninterrupted, for comparison
    graph = space.build_canonical(space.canonical(params))
    reference = train_graph(graph, dataclasses_replace(cfg, val_size=0, eval_split="test", output=None))

    # the report's run dies in its third epoch (after two checkpoints), then its last.pth is damaged
    real_epoch = GraphTrainer._train_epoch

    def dies_in_epoch_3(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real_epoch(self, epoch)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(GraphTrainer, "_train_epoch", dies_in_epoch_3)
        run_report(study, space, cfg, tmp_path, ReportSettings(top=1, seeds=1), **report_cfg)
    (run,) = (tmp_path / "report").glob("*/seed0")
    last = run / "checkpoints" / "last.pth"
    _truncate(last)
    size = last.stat().st_size
    capsys.readouterr()
    report = run_report(study, space, cfg, tmp_path, ReportSettings(top=1, seeds=1), **report_cfg)
    assert one_line(capsys.readouterr().err, "warning", "search_dcl.py") == (
        f"search_dcl.py: warning: {last} is damaged ({size} bytes whose SHA-256 differs from the one "
        "last.pth.sha256 recorded); resuming from last.prev.pth at epoch 1")
    # nothing lost: the report's number is the uninterrupted run's
    assert report["rows"][0]["top1"] == [reference.history[-1]["top1"][0]]

    # no usable checkpoint at all: one line says so, and the run is trained again from the start
    # (same seed, so the same number)
    _truncate(run / "checkpoints" / "last.prev.pth")
    _truncate(last)
    (run / "metrics.jsonl").write_text("{\"epoch\": 1, \"top1\"")  # a torn line: unfinished, read past
    lines = []
    report = run_report(study, space, cfg, tmp_path, ReportSettings(top=1, seeds=1),
                        **{**report_cfg, "say": lines.append})
    damaged = [m for m in lines if "no usable checkpoint" in m]
    assert len(damaged) == 1 and damaged[0].endswith("; training it again from the start"), lines
    assert f"{last} is damaged" in damaged[0]
    assert report["rows"][0]["top1"] == [reference.history[-1]["top1"][0]]
    assert issubclass(NoUsableCheckpointError, ValueError)


def dataclasses_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)
