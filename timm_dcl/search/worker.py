"""The worker loop: one process trains trials of the shared study until it holds ``n_trials``.

Exactly ``n_trials`` finished trials. Optuna can only *add* trials, so every trial is first
created (``Study.optimize`` asks for it) and then admitted only if fewer than ``n_trials``
trials numbered before it are finished, running or waiting; otherwise it was a surplus
reservation (workers raced for the last slots) and fails at once without sampling anything.
Failed trials never count, so at most ``n_trials`` finish. Optuna's ``MaxTrialsCallback``
stops a worker once the study is full; what Optuna lacks, and is written here, is the
admission above and the wait of a worker whose remaining slots are all held by running
trials (one of them may still die and free its slot).

Before sampling, the study runs the baselines (:meth:`SearchSpace.baselines`) through
``Study.enqueue_trial``. A sampled graph canonically equal to a finished trial is not trained
again: it replays that trial's validation curve and outcome (``duplicate_of``).
"""
from __future__ import annotations

import dataclasses
import io
import os
import socket
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from ..graph import Graph
from ..preemption import Preempted, stop_requested
from .space import InvalidGraph, SearchSpace, split_key
from .storage import Heartbeat, JournalHeartbeatStorage, fail_stale

__all__ = ["WorkerInfo", "isolate_worker", "SearchWorker", "enqueue_baselines", "trial_key", "FINISHED"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: States that hold (or may still take) one of the study's ``n_trials`` slots.
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class SurplusTrial(Exception):
    """A trial created after the study's last slot was taken: it fails without sampling."""


def trial_key(space: SearchSpace, trial: FrozenTrial) -> Optional[str]:
    """The canonical graph of a trial (None: it sampled nothing)."""
    key = trial.user_attrs.get("graph")
    if key is None and all(p in trial.params for p in space.param_names()):
        key = space.canonical(trial.params).key
    return key


def enqueue_baselines(study: optuna.Study, space: SearchSpace) -> list[str]:
    """Queue every baseline graph the study has not run, is not running and has not queued.

    Hand-written rather than ``enqueue_trial(skip_if_exists=True)``, which also skips a
    baseline whose only trial failed (its worker died) and so would never run it. Workers
    starting at the same moment may both queue one; the second copy then replays the first.
    """
    present = {trial_key(space, t) for t in study.get_trials(deepcopy=False, states=LIVE)}
    queued = []
    for b in space.baselines():
        key = space.canonical(b.params).key
        if key not in present:
            study.enqueue_trial(b.params, user_attrs={"baseline": b.name, "graph": key})
            present.add(key)
            queued.append(b.name)
    return queued


@dataclass(frozen=True)
class WorkerInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}" + (f":rank{self.rank}" if self.world_size > 1 else "")


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "PMI_RANK",
             "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
             "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")


def isolate_worker(environ: Optional[dict] = None, num_gpus: Optional[int] = None) -> WorkerInfo:
    """Turn a process of ``accelerate launch --num_processes N`` into an independent worker.

    Search workers share a study, not gradients: each trains its own trials on its own
    device. This hides the launcher's process-group variables, so the trainer's Accelerator
    runs single-process, and puts worker ``LOCAL_RANK`` on GPU ``LOCAL_RANK mod num_gpus``
    (``ACCELERATE_TORCH_DEVICE``; more workers than GPUs share them). CPU workers split the
    cores. ``environ``/``num_gpus`` default to this process's and torch's (tests pass their own).
    """
    env = os.environ if environ is None else environ

    def first_int(*keys: str) -> Optional[int]:
        for k in keys:
            v = env.get(k)
            if v not in (None, ""):
                try:
                    return int(v)
                except ValueError:
                    return None
        return None

    world = first_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
    local = first_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
    if world is None and local is None:
        return WorkerInfo()
    rank = first_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK") or 0
    local = local if local is not None else rank
    local_world = first_int("LOCAL_WORLD_SIZE") or world or 1
    for k in _DIST_ENV:
        env.pop(k, None)
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    torch = None
    if environ is None:
        import torch
    if num_gpus is None:
        num_gpus = torch.cuda.device_count() if torch is not None and not use_cpu else 0
    if num_gpus > 0 and not use_cpu:
        device = local % num_gpus
        env["ACCELERATE_TORCH_DEVICE"] = f"cuda:{device}"
        if torch is not None:
            torch.cuda.set_device(device)
    elif torch is not None:
        # CPU workers on one machine share its cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return WorkerInfo(rank=rank, local_rank=local, world_size=world or 1)


class SearchWorker:
    """One worker of a study: runs trials until ``n_trials`` trials of the study have finished."""

    def __init__(self, study: optuna.Study, storage: BaseStorage, space: SearchSpace, cfg, data, *,
                 n_trials: int, poll_interval: float = 5.0, worker: Optional[WorkerInfo] = None,
                 log_file: Optional[str | os.PathLike] = None, say: Callable[[str], None] = print,
                 progress: Optional[Callable[[int, int], None]] = None, max_rejections: int = 10_000,
                 max_failures: int = 10):
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
            raise ValueError(f"--n-trials must be an integer ≥ 1, got {n_trials!r}")
        if cfg.val_size < 1:
            raise ValueError("the search measures node 0 on a validation split held out of the training data: "
                             "--val-size must be ≥ 1")
        self.study, self.storage, self.space, self.data = study, storage, space, data
        # ASHA compares trials at every rung epoch: trials evaluate every epoch (--eval-every is the report's)
        self.cfg = dataclasses.replace(cfg, eval_split="val", output=None, resume=None, progress_bar=False,
                                       eval_every=1)
        self.n_trials = n_trials
        self.poll_interval = poll_interval
        self.worker = worker or WorkerInfo()
        self.log_file = Path(log_file) if log_file else None
        self.say = say
        self.progress = progress
        self.max_rejections = max_rejections
        self.max_failures = max_failures
        self.trials_run = 0
        self._rejections = self._failures = 0
        self._study_id = storage.get_study_id_from_name(study.study_name)

    # -- the loop
    def run(self) -> int:
        """Run trials until the study has ``n_trials`` finished ones; returns how many ran here."""
        import torch

        catch = (InvalidGraph, SurplusTrial, FloatingPointError, torch.OutOfMemoryError)
        callbacks = [MaxTrialsCallback(self.n_trials, states=FINISHED), self._after_trial]
        verbosity = optuna.logging.get_verbosity()
        # our own line per trial; Optuna would add a traceback for every rejected sample
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            while self._wait_for_slot():
                try:
                    self.study.optimize(self._objective, catch=catch, callbacks=callbacks, gc_after_trial=True)
                    break
                except (UpdateFinishedTrialError, ValueError) as e:
                    # another worker failed our trial while we trained it (its heartbeat was late)
                    if isinstance(e, ValueError) and not str(e).startswith("Cannot tell a"):
                        raise
                    self.trials_run += 1
                    self.say("a trial of this worker was marked failed by another one (its heartbeat was late); "
                             "its result is dropped")
        finally:
            optuna.logging.set_verbosity(verbosity)
        return self.trials_run

    def _counts(self) -> tuple[int, int]:
        trials = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        finished = sum(1 for t in trials if t.state in FINISHED)
        return finished, len(trials) - finished

    def _wait_for_slot(self) -> bool:
        """Wait while every free slot is held by a running trial; False once the study is full."""
        while True:
            self._stop_if_asked()
            fail_stale(self.study, self.storage)
            finished, running = self._counts()
            if self.progress:
                self.progress(finished, self.n_trials)
            if finished >= self.n_trials:
                return False
            if finished + running < self.n_trials:
                return True
            time.sleep(self.poll_interval)

    @staticmethod
    def _stop_if_asked() -> None:
        """Between trials, a stop signal stops the worker at once (inside one, the trainer does)."""
        name = stop_requested()
        if name is not None:
            raise Preempted(name, text="between trials: no trial was running")

    def _requeue(self, trial: Trial, key: str) -> None:
        """A trial stopped by a signal fails (its slot is freed) and its graph is queued again, so a
        resumed study trains it next, from its start (trials keep no checkpoint)."""
        attrs = {"graph": key, "requeued_from": trial.number}
        if "baseline" in trial.user_attrs:
            attrs["baseline"] = trial.user_attrs["baseline"]
        trial.set_user_attr("preempted", True)
        self.study.enqueue_trial(dict(trial.params), user_attrs=attrs)

    def _admitted(self, trial: Trial) -> bool:
        ahead = sum(1 for t in self.study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number)
        return ahead < self.n_trials

    def _after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Count rejections and failures, log the trial, and wait for a slot (or stop the study)."""
        _empty_device_cache()  # after Optuna's gc_after_trial freed the trial's tensors
        attrs = trial.user_attrs
        if not attrs.get("surplus"):
            invalid = "invalid" in attrs
            failed = trial.state == TrialState.FAIL and not invalid
            self._rejections = self._rejections + 1 if invalid else 0
            self._failures = self._failures + 1 if failed else 0
            if not invalid:
                self.trials_run += 1
                self.say(self._line(trial))
            if self._rejections >= self.max_rejections:
                raise RuntimeError(f"{self._rejections} sampled graphs in a row were invalid; give --pretrained-dir "
                                   "checkpoints for the candidates or use more nodes")
            if self._failures >= self.max_failures:
                raise RuntimeError(f"{self._failures} trials in a row failed to train (see trials.csv); stopping "
                                   "this worker rather than failing every trial of the study")
        if not self._wait_for_slot():
            study.stop()

    def _line(self, trial: FrozenTrial) -> str:
        attrs = trial.user_attrs
        models, gates, features = split_key(attrs.get("graph", ""))
        graph = f"{models}  [{gates}]" + (f"  features [{features}]" if features else "")
        if trial.state == TrialState.FAIL:
            return f"trial {trial.number:>4} failed: {attrs.get('error', '?')}  {graph}"
        shown = "pruned" if trial.state == TrialState.PRUNED else f"{trial.value:6.2f}%"
        took = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else 0.0
        role = f" [{attrs['baseline']}]" if "baseline" in attrs else ""
        dup = f" (duplicate of trial {attrs['duplicate_of']}, not trained)" if "duplicate_of" in attrs else ""
        return (f"trial {trial.number:>4} {trial.state.name.lower():<8} {shown:>8} after "
                f"{len(trial.intermediate_values)} epoch(s) in {took:.0f}s{role}{dup}  {graph}")

    # -- one trial
    def _objective(self, trial: Trial) -> float:
        if isinstance(self.storage, JournalHeartbeatStorage):
            fail_stale(self.study, self.storage)  # Study.optimize does this for storages with a heartbeat
        if not self._admitted(trial):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study's {self.n_trials} slots are taken")
        try:
            self.space.sample(trial)
        except InvalidGraph as e:
            # Rejection sampling: the trial holds no slot and teaches the sampler nothing, so the
            # graphs that do train are drawn from the space restricted to valid graphs.
            trial.set_user_attr("invalid", str(e))
            raise
        canon = self.space.canonical(trial.params)
        graph = self.space.canonical_build(trial.params)  # the form that is stored is the one trained
        trial.set_user_attr("graph", canon.key)
        trial.set_user_attr("worker", self.worker.name)
        trial.set_user_attr("frozen", list(graph.frozen_nodes))
        twin = self._twin(trial.number, canon.key)
        if twin is not None and twin.state in FINISHED:
            return self._replay(trial, twin)
        if twin is not None:  # still running: its result is not there to reuse
            trial.set_user_attr("same_as_running", twin.number)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, trial.number)
        with Heartbeat(self.storage, trial_id):
            try:
                return self._train(trial, graph)
            except optuna.TrialPruned:
                raise
            except Preempted as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
                self._requeue(trial, canon.key)
                raise
            except BaseException as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
                raise

    def _twin(self, number: int, key: str) -> Optional[FrozenTrial]:
        """The earliest other trial of the same canonical graph: finished first, else running."""
        same = [t for t in self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                if t.number != number and t.user_attrs.get("graph") == key]
        done = [t for t in same if t.state in FINISHED]
        return min(done or same, key=lambda t: t.number, default=None)

    @staticmethod
    def _replay(trial: Trial, twin: FrozenTrial) -> float:
        """The twin's validation curve and outcome, without training the graph again."""
        trial.set_user_attr("duplicate_of", twin.number)
        for key in ("top1", "ensemble_top1"):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        for step in sorted(twin.intermediate_values):
            trial.report(twin.intermediate_values[step], step)
        if twin.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"as trial {twin.number}")
        return float(twin.value)

    def _train(self, trial: Trial, graph: Graph) -> float:
        from ..trainer import train_graph

        cfg = dataclasses.replace(self.cfg, seed=self.cfg.seed + trial.number)

        def on_epoch(record: dict) -> None:
            epoch, top1 = int(record["epoch"]), float(record["top1"][0])
            trial.report(top1, epoch)
            # a trial that trained its whole budget completes: ASHA has no rung beyond the last epoch
            if epoch < cfg.epochs and trial.should_prune():
                self._record(trial, record)
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        with self._trainer_output():
            result = train_graph(graph, cfg, data=self.data, epoch_callback=on_epoch)
        if not result.history:
            raise RuntimeError("the trainer ran no epoch")
        self._record(trial, result.history[-1])
        return float(result.history[-1]["top1"][0])

    @staticmethod
    def _record(trial: Trial, record: dict) -> None:
        trial.set_user_attr("top1", [round(float(v), 4) for v in record["top1"]])
        trial.set_user_attr("ensemble_top1", round(float(record["ensemble_top1"]), 4))

    @contextmanager
    def _trainer_output(self) -> Iterator[None]:
        """The trainer's per-epoch lines go to the worker's log file, not over the progress bar."""
        if self.log_file is None:
            with redirect_stdout(io.StringIO()):
                yield
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a", buffering=1) as f, redirect_stdout(f):
            yield


def _empty_device_cache() -> None:
    """Hand the GPU memory the last trial cached back to the device, for other processes."""
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
