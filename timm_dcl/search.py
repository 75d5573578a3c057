"""Graph search (SPEC §6): ASHA over the node models and edge gates of a Knowledge Transfer Graph.

One Optuna study, any number of workers (processes, or machines) attached to one storage.
A trial samples the model of every node but node 0 and the gate of each of the M² edges,
trains the graph with :func:`timm_dcl.trainer.train_graph`, and reports node 0's top-1 on a
validation split held out of the training data after every epoch, so that the
SuccessiveHalvingPruner can stop it early.

Exactly ``n_trials`` finished trials. Optuna can only *add* trials, so a worker first creates
its trial and then admits it only if fewer than ``n_trials`` trials numbered before it are
finished or still running; otherwise the trial was a surplus reservation (workers raced for
the last slots) and is closed as FAIL without sampling or training anything. FAIL trials never
count, so at most ``n_trials`` trials ever finish; workers keep going (or wait for the running
ones) until that many have, then all stop.

Dead workers. Every running trial records a heartbeat; a worker that finds a RUNNING trial
whose heartbeat is older than the grace period marks it FAIL (``optuna.storages.fail_stale_trials``),
and since it no longer counts, another trial takes its slot. RDB storages (PostgreSQL, MySQL,
SQLite) have Optuna's own heartbeat; the embedded journal file gets one here.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import gc
import io
import json
import math
import os
import re
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat  # the documented way to give a storage a heartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from .gates import GATE_NAMES, Gate
from .graph import Graph, Node
from .pretrained import find_pretrained, pretrained_path, retarget_pretrained  # noqa: F401

__all__ = [
    "DEFAULT_CANDIDATES",
    "InvalidGraph",
    "SearchSpace",
    "StorageError",
    "WorkerInfo",
    "find_pretrained",
    "pretrained_path",
    "retarget_pretrained",
    "open_storage",
    "make_sampler",
    "make_pruner",
    "open_study",
    "SearchWorker",
    "write_report",
    "isolate_worker",
    "trial_graph",
    "rung_epochs",
]

#: The models the paper searched over for nodes 1…M−1 (SPEC §6).
DEFAULT_CANDIDATES = ("resnet32", "resnet110", "wrn28_2")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: States that hold (or may still take) one of the study's ``n_trials`` slots.
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
SETTINGS_KEY = "timm_dcl_search"
SURPLUS_KEY = "timm_dcl:surplus"
HEARTBEAT_KEY = "timm_dcl:heartbeat"
_CUTOFF = GATE_NAMES[Gate.CUTOFF]


class InvalidGraph(ValueError):
    """A sampled graph that cannot be trained (an all-cutoff row without a pre-trained checkpoint)."""


class StorageError(RuntimeError):
    """The study storage cannot be opened or reached."""


# ----------------------------------------------------------------------------------------------
# pre-trained nodes


# ----------------------------------------------------------------------------------------------
# the search space


def _check_model(name: str, what: str) -> str:
    import timm

    from . import models  # noqa: F401  (registers the CIFAR networks with timm)

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what}: expected a timm model name, got {name!r}")
    name = name.strip()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{what}: unknown timm model {name!r}{hint}")
    return name


@dataclass(frozen=True)
class SearchSpace:
    """The models of nodes 1…M−1 (from ``candidates``) and the gates of all M² edges.

    Parameters are named ``model_<n>`` and ``gate_<t>_<s>`` (the edge from source s into
    target t, as in ``gates[t][s]``). Node 0 is always ``target_model`` and always trained.
    A node n ≥ 1 whose sampled row is all cutoff is a frozen pre-trained teacher when
    ``pretrained_dir`` holds a checkpoint of its model on ``dataset``; otherwise the sample
    is invalid (:class:`InvalidGraph`).
    """

    num_nodes: int
    target_model: str = "resnet32"
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    dataset: str = "cifar100"
    pretrained_dir: Optional[str] = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        from .ops import MAX_NODES

        m = self.num_nodes
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"--num-nodes must be an integer, got {type(m).__name__}")
        if m < 1:
            raise ValueError(f"--num-nodes must be ≥ 1, got {m}")
        if m > MAX_NODES:
            raise ValueError(f"--num-nodes must be ≤ {MAX_NODES} (the loss kernels' limit), got {m}")
        object.__setattr__(self, "target_model", _check_model(self.target_model, "--target-model"))
        if isinstance(self.candidates, str):
            raise TypeError("candidates must be a sequence of model names, not one string")
        candidates = tuple(_check_model(c, "--candidates") for c in self.candidates)
        if m > 1 and not candidates:
            raise ValueError("--candidates is empty: nodes 1…M−1 need at least one model to choose from")
        seen = set()
        for c in candidates:
            if c in seen:
                raise ValueError(f"--candidates lists {c!r} twice")
            seen.add(c)
        object.__setattr__(self, "candidates", candidates)
        if self.pretrained_dir is not None and not Path(self.pretrained_dir).is_dir():
            raise ValueError(f"--pretrained-dir {self.pretrained_dir}: not a directory")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"--temperature must be a finite number > 0, got {t!r}")

    # -- what a trial samples
    def param_names(self) -> list[str]:
        m = self.num_nodes
        return [f"model_{n}" for n in range(1, m)] + [f"gate_{t}_{s}" for t in range(m) for s in range(m)]

    def pretrained(self) -> dict[str, Optional[Path]]:
        """The checkpoint available for each candidate (None: it cannot be a frozen node)."""
        return {c: find_pretrained(self.pretrained_dir, self.dataset, c) for c in self.candidates}

    def sample(self, trial: Trial) -> Graph:
        """Suggest every parameter of ``trial`` and build its graph (may raise InvalidGraph)."""
        models = [trial.suggest_categorical(f"model_{n}", self.candidates) for n in range(1, self.num_nodes)]
        gates = [[trial.suggest_categorical(f"gate_{t}_{s}", GATE_NAMES) for s in range(self.num_nodes)]
                 for t in range(self.num_nodes)]
        return self.build(models, gates)

    def graph_from_params(self, params: dict[str, Any]) -> Graph:
        """The graph of a finished trial's parameters."""
        missing = [p for p in self.param_names() if p not in params]
        if missing:
            raise ValueError(f"trial parameters lack {', '.join(missing[:4])}: not a trial of this search space")
        m = self.num_nodes
        models = [params[f"model_{n}"] for n in range(1, m)]
        gates = [[params[f"gate_{t}_{s}"] for s in range(m)] for t in range(m)]
        return self.build(models, gates)

    def build(self, models: Sequence[str], gates: Sequence[Sequence[str]]) -> Graph:
        """Node 0 = the target, then ``models``; all-cutoff rows become frozen pre-trained nodes."""
        names = [self.target_model, *models]
        nodes = []
        for t, model in enumerate(names):
            if any(g != _CUTOFF for g in gates[t]):
                nodes.append(Node(model))
                continue
            if t == 0:
                raise InvalidGraph("node 0 (the target) has an all-cutoff gate row, so it would learn nothing")
            ckpt = find_pretrained(self.pretrained_dir, self.dataset, model)
            if ckpt is None:
                where = f"--pretrained-dir {self.pretrained_dir}" if self.pretrained_dir else "no --pretrained-dir"
                raise InvalidGraph(f"node {t} ({model}) has an all-cutoff gate row but {where} holds no "
                                   f"{model} checkpoint for {self.dataset}")
            nodes.append(Node(model, checkpoint=str(ckpt), frozen=True))
        return Graph(nodes, [list(row) for row in gates], self.temperature)

    def settings(self) -> dict[str, Any]:
        """What must agree between the workers of one study (the checkpoint folder may not)."""
        return {"num_nodes": self.num_nodes, "target_model": self.target_model,
                "candidates": list(self.candidates), "dataset": self.dataset, "temperature": self.temperature}


def trial_graph(space: SearchSpace, trial: FrozenTrial) -> Graph:
    return space.graph_from_params(trial.params)


# ----------------------------------------------------------------------------------------------
# storage


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with a heartbeat (RDBStorage has its own; the journal has none).

    A heartbeat is a trial system attribute holding the writer's wall-clock time; the workers
    of one journal file share a file system, and in practice a clock.
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: Optional[int] = None) -> None:
        super().__init__(backend)
        if heartbeat_interval < 1:
            raise ValueError(f"--heartbeat-interval must be ≥ 1 second, got {heartbeat_interval}")
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period) if grace_period is not None else 2 * self.heartbeat_interval

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_KEY)
            if beat is None:  # killed before its first beat: the start time is the last sign of life
                beat = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - float(beat) > self.grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return None


def _mask_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: hide anything between ':' and '@'
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def _error_text(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return text[0] if text else type(e).__name__


# drivers SQLAlchemy can use for a dialect, its default first
_DRIVERS = {"postgresql": (("psycopg2", "psycopg2"), ("psycopg", "psycopg"), ("pg8000", "pg8000")),
            "mysql": (("mysqldb", "MySQLdb"), ("pymysql", "pymysql"), ("mysqlconnector", "mysql.connector"))}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def _with_installed_driver(url: str, dialect: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        default = make_url(url).get_dialect().driver
    except Exception:  # noqa: BLE001  (the default driver is not importable, or the URL is odd)
        default = None
    for driver, module in _DRIVERS.get(dialect, ()):
        if driver == default and _installed(module):
            return url
    for driver, module in _DRIVERS.get(dialect, ()):
        if _installed(module):
            return f"{dialect}+{driver}" + url[len(dialect):]
    return url


def open_storage(storage: Optional[str], default_path: str | os.PathLike, *, heartbeat_interval: int = 60,
                 grace_period: Optional[int] = None, retries: int = 3) -> BaseStorage:
    """The study storage for ``--storage``.

    ``None``: an embedded journal file at ``default_path`` that local processes share safely
    (appends under a lock file). A plain path: a journal file there. ``dialect://...``: any
    SQLAlchemy URL Optuna's RDBStorage takes (``postgresql://user:pw@host/db``, ``sqlite:///f.db``).
    """
    if heartbeat_interval < 1:
        raise ValueError(f"--heartbeat-interval must be ≥ 1 second, got {heartbeat_interval}")
    if grace_period is not None and grace_period < 1:
        raise ValueError(f"--grace-period must be ≥ 1 second, got {grace_period}")
    if storage is None or "://" not in storage:
        path = Path(storage if storage is not None else default_path)
        if path.is_dir():
            raise StorageError(f"--storage {path} is a directory; give a journal file or a database URL")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path)))
            return JournalHeartbeatStorage(backend, heartbeat_interval, grace_period)
        except OSError as e:
            raise StorageError(f"cannot open the study journal {path}: {e}") from None
        except (ValueError, json.JSONDecodeError) as e:
            raise StorageError(f"{path} is not an Optuna journal file: {e}") from None

    masked = _mask_url(storage)
    scheme = storage.split("://", 1)[0].lower()
    dialect = scheme.split("+", 1)[0]
    engine_kwargs: dict[str, Any] = {}
    if dialect == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif dialect in ("postgresql", "postgres", "mysql", "mariadb"):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if dialect == "postgres":  # SQLAlchemy 2 only knows the long name
        storage, scheme, dialect = "postgresql" + storage[len("postgres"):], "postgresql" + scheme[8:], "postgresql"
    if scheme == dialect:  # no driver named: SQLAlchemy's default may be missing where another is installed
        storage = _with_installed_driver(storage, dialect)
    last: Optional[BaseException] = None
    for attempt in range(retries):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(storage, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                  grace_period=grace_period)
        except ImportError as e:
            hint = " (pip install 'timm-dcl[postgres]')" if dialect == "postgresql" else ""
            raise StorageError(f"--storage {masked}: its database driver is not installed{hint}: "
                               f"{_error_text(e.__cause__ or e)}") from None
        except Exception as e:  # noqa: BLE001  (SQLAlchemy raises many kinds; all mean "cannot open")
            last = e
            text = _error_text(e).lower()
            unreachable = any(s in text for s in ("could not connect", "connection refused", "could not translate",
                                                 "timeout expired", "name or service not known", "can't connect",
                                                 "no such", "does not exist", "password authentication",
                                                 "unable to open", "can't load plugin"))
            if unreachable or attempt == retries - 1:
                break
            # two workers creating the tables of a fresh database at once: one of them retries
            time.sleep(0.5 + attempt)
    raise StorageError(f"cannot open the study storage {masked}: {_error_text(last)}") from None


# ----------------------------------------------------------------------------------------------
# study


def make_sampler(name: str, seed: Optional[int] = None) -> optuna.samplers.BaseSampler:
    """``random`` (the paper's) or ``tpe`` (with the constant liar, for parallel workers)."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    raise ValueError(f"--sampler must be 'random' or 'tpe', got {name!r}")


def make_pruner(min_resource: int = 1, reduction_factor: int = 2) -> optuna.pruners.SuccessiveHalvingPruner:
    """ASHA as the paper ran it: rungs at ``min_resource · reduction_factor^k`` epochs."""
    if isinstance(min_resource, bool) or not isinstance(min_resource, int) or min_resource < 1:
        raise ValueError(f"--min-resource must be an integer ≥ 1 (epochs), got {min_resource!r}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 2:
        raise ValueError(f"--reduction-factor must be an integer ≥ 2, got {reduction_factor!r}")
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor,
                                                  min_early_stopping_rate=0)


def rung_epochs(min_resource: int, reduction_factor: int, epochs: int) -> list[int]:
    """The epochs at which ASHA compares trials (rung k: min_resource · reduction_factor^k)."""
    out, r = [], min_resource
    while r < epochs:
        out.append(r)
        r *= reduction_factor
    return out


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def open_study(storage: BaseStorage, study_name: str, settings: dict[str, Any], *,
               sampler: Optional[optuna.samplers.BaseSampler] = None,
               pruner: Optional[optuna.pruners.BasePruner] = None) -> optuna.Study:
    """Create the study, or load it to resume; a study made with other settings is an error."""
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot create or load study {study_name!r}: {_error_text(e)}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"study {study_name!r} exists in the storage but minimises; it is not a timm-dcl search")
    settings = _canonical(settings)
    stored = study.user_attrs.get(SETTINGS_KEY)
    if stored is None:
        study.set_user_attr(SETTINGS_KEY, settings)
    elif stored != settings:
        diff = [f"{k}: {stored.get(k)!r} in the study, {settings.get(k)!r} now"
                for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        raise ValueError(f"study {study_name!r} was started with other settings ({'; '.join(diff)}); "
                         "resume it with the same settings, or pick another --study-name")
    return study


def search_settings(space: SearchSpace, cfg, *, min_resource: int, reduction_factor: int) -> dict[str, Any]:
    """Everything that makes trials comparable: the space, the data split, the recipe, ASHA."""
    keys = ("train_subset", "val_size", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
            "sched", "decay_milestones", "decay_rate", "seed")
    return {**space.settings(), **{k: getattr(cfg, k) for k in keys},
            "min_resource": min_resource, "reduction_factor": reduction_factor}


# ----------------------------------------------------------------------------------------------
# workers


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


class _Heartbeat:
    """Records a trial's heartbeat every interval on a background thread."""

    def __init__(self, storage: BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
        self.lost = False  # another worker marked the trial failed
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_Heartbeat":
        if self.interval:
            self._beat()  # at once: a trial without a beat can look alive forever to an RDB storage
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.trial_id}", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except UpdateFinishedTrialError:
            self.lost = True
            self._stop.set()
        except Exception as e:  # noqa: BLE001  (a storage hiccup: the next beat may get through)
            print(f"search: heartbeat of trial id {self.trial_id} failed: {_error_text(e)}", file=sys.stderr)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _counts(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """Finished and running trials (a WAITING, enqueued trial runs when a worker asks for one)."""
    finished = sum(1 for t in trials if t.state in FINISHED)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return finished, running


def _tell(study: optuna.Study, trial: Trial, **kwargs) -> bool:
    """``study.tell``, False if another worker already closed the trial (its heartbeat was lost)."""
    try:
        study.tell(trial, **kwargs)
        return True
    except UpdateFinishedTrialError:
        return False
    except ValueError as e:  # "Cannot tell a FAIL trial.": it was closed before tell looked
        if str(e).startswith("Cannot tell a"):
            return False
        raise


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
        self.cfg = dataclasses.replace(cfg, eval_split="val", output=None, resume=None, progress_bar=False)
        self.n_trials = n_trials
        self.poll_interval = poll_interval
        self.worker = worker or WorkerInfo()
        self.log_file = Path(log_file) if log_file else None
        self.say = say
        self.progress = progress
        self.max_rejections = max_rejections
        self.max_failures = max_failures
        self.trials_run = 0

    # -- the loop
    def run(self) -> int:
        """Run trials until the study has ``n_trials`` finished ones; returns how many ran here."""
        rejections = failures = 0
        while True:
            _fail_stale(self.study)
            trials = self.study.get_trials(deepcopy=False)
            finished, running = _counts(trials)
            if self.progress:
                self.progress(finished, self.n_trials)
            if finished >= self.n_trials:
                return self.trials_run
            if finished + running >= self.n_trials:
                # every remaining slot is taken by a running trial: wait for it to end (or die)
                time.sleep(self.poll_interval)
                continue
            with warnings.catch_warnings():
                # we run the heartbeat ourselves, as Study.optimize would
                warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
                trial = self.study.ask()
            if not self._admitted(trial):
                self.study._storage.set_trial_system_attr(trial._trial_id, SURPLUS_KEY, True)
                _tell(self.study, trial, state=TrialState.FAIL)
                continue
            outcome = self._run_trial(trial)
            rejections = rejections + 1 if outcome == "invalid" else 0
            failures = failures + 1 if outcome == "failed" else 0
            if rejections >= self.max_rejections:
                raise RuntimeError(f"{rejections} sampled graphs in a row were invalid; give --pretrained-dir "
                                   "checkpoints for the candidates or use more nodes")
            if failures >= self.max_failures:
                raise RuntimeError(f"{failures} trials in a row failed to train (see trials.csv); stopping this "
                                   "worker rather than failing every trial of the study")

    def _admitted(self, trial: Trial) -> bool:
        ahead = sum(1 for t in self.study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number)
        return ahead < self.n_trials

    def _run_trial(self, trial: Trial) -> str:
        try:
            graph = self.space.sample(trial)
        except InvalidGraph as e:
            # Rejection sampling: the trial holds no slot and teaches the sampler nothing, so the
            # graphs that do train are drawn from the space restricted to valid graphs.
            trial.set_user_attr("invalid", str(e))
            _tell(self.study, trial, state=TrialState.FAIL)
            return "invalid"
        trial.set_user_attr("worker", self.worker.name)
        trial.set_user_attr("frozen", list(graph.frozen_nodes))
        start = time.perf_counter()
        reported: list[int] = []
        with _Heartbeat(self.storage, trial._trial_id) as beat:
            try:
                value = self._train(trial, graph, reported)
            except optuna.TrialPruned:
                state, value = TrialState.PRUNED, None
            except UpdateFinishedTrialError:
                state, value = None, None  # another worker failed this trial: our heartbeat was lost
            except BaseException as e:
                recoverable = isinstance(e, _recoverable_errors())
                try:
                    trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
                    _tell(self.study, trial, state=TrialState.FAIL)
                except Exception:  # noqa: BLE001  (report the training error, not this one)
                    pass
                if not recoverable:
                    raise
                # this graph cannot be trained under this recipe (diverged, or too big for the
                # device): the trial fails, holds no slot, and the search goes on
                self.say(f"trial {trial.number:>4} failed: {type(e).__name__}: {e}  {_graph_text(graph)}")
                self.trials_run += 1
                return "failed"
            else:
                state = TrialState.COMPLETE
        self.trials_run += 1
        if state is None or beat.lost or not (_tell(self.study, trial, state=state) if value is None
                                               else _tell(self.study, trial, values=value)):
            self.say(f"trial {trial.number}: another worker marked it failed (its heartbeat was late); "
                     "its result is dropped")
            return "lost"
        shown = "pruned" if state == TrialState.PRUNED else f"{value:6.2f}%"
        self.say(f"trial {trial.number:>4} {state.name.lower():<8} {shown:>8} after {len(reported)} epoch(s) "
                 f"in {time.perf_counter() - start:.0f}s  {_graph_text(graph)}")
        return state.name.lower()

    def _train(self, trial: Trial, graph: Graph, reported: list[int]) -> float:
        from .trainer import train_graph

        cfg = dataclasses.replace(self.cfg, seed=self.cfg.seed + trial.number)

        def on_epoch(record: dict) -> None:
            epoch, top1 = int(record["epoch"]), float(record["top1"][0])
            trial.report(top1, epoch)
            reported.append(epoch)
            # a trial that trained its whole budget completes: ASHA has no rung beyond the last epoch
            if epoch < cfg.epochs and trial.should_prune():
                self._record(trial, record)
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        with self._trainer_output():
            try:
                result = train_graph(graph, cfg, data=self.data, epoch_callback=on_epoch)
            finally:
                _release_memory()
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


def _recoverable_errors() -> tuple[type[BaseException], ...]:
    """Errors that condemn one sampled graph, not the worker: a diverged loss, an out-of-memory."""
    import torch

    return (FloatingPointError, torch.OutOfMemoryError)


def _release_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _graph_text(graph: Graph) -> str:
    models = ",".join(n.model + ("*" if n.frozen else "") for n in graph.nodes)
    gates = ";".join(",".join(row) for row in graph.gates)
    return f"{models}  [{gates}]"


# ----------------------------------------------------------------------------------------------
# report


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _epochs(t: FrozenTrial) -> int:
    return max(t.intermediate_values, default=0)


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials by value, best first; if none completed, pruned ones by (epochs, value)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if complete:
        return sorted(complete, key=lambda t: (-t.value, t.number))
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    return sorted(pruned, key=lambda t: (-_epochs(t), -t.intermediate_values[_epochs(t)], t.number))


def _note(t: FrozenTrial) -> str:
    if "invalid" in t.user_attrs:
        return "invalid: " + t.user_attrs["invalid"]
    if "error" in t.user_attrs:
        return "error: " + t.user_attrs["error"]
    if t.state == TrialState.FAIL:
        return "worker lost (no heartbeat)"
    return ""


def write_trials_csv(study: optuna.Study, space: SearchSpace, path: Path) -> int:
    """One row per trial (surplus reservations, which sampled nothing, are left out)."""
    params = space.param_names()
    header = ["number", "state", "value", "epochs", "duration_s", "model_0", *params, "gates", "frozen",
              "top1_nodes", "worker", "datetime_start", "note"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    rows = 0
    for t in study.get_trials(deepcopy=False):
        if t.system_attrs.get(SURPLUS_KEY):
            continue
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else ""
        m = space.num_nodes
        gates = ";".join(",".join(str(t.params.get(f"gate_{r}_{s}", "")) for s in range(m)) for r in range(m)) \
            if t.params else ""
        w.writerow([t.number, t.state.name, "" if t.value is None else f"{t.value:.4f}", _epochs(t),
                    f"{duration:.1f}" if duration != "" else "", space.target_model,
                    *[t.params.get(p, "") for p in params], gates,
                    " ".join(str(i) for i in t.user_attrs.get("frozen", [])),
                    " ".join(f"{v:.2f}" for v in t.user_attrs.get("top1", [])),
                    t.user_attrs.get("worker", ""),
                    t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "", _note(t)])
        rows += 1
    _atomic_write_text(path, buf.getvalue())
    return rows


def plot_rungs(study: optuna.Study, path: Path, *, min_resource: int, reduction_factor: int, epochs: int,
               best: Optional[int] = None) -> None:
    """Every trial's node-0 validation top-1 by epoch; rungs dashed, pruned trials end in ×."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    styles = {TrialState.COMPLETE: ("#1f5fa8", 0.8), TrialState.PRUNED: ("#8c8c8c", 0.5),
              TrialState.RUNNING: ("#e08a00", 0.8), TrialState.FAIL: ("#c8412c", 0.4)}
    seen = set()
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values or t.state not in styles:
            continue
        xs = sorted(t.intermediate_values)
        ys = [t.intermediate_values[x] for x in xs]
        color, alpha = styles[t.state]
        seen.add(t.state)
        is_best = t.number == best
        ax.plot(xs, ys, "-", color="black" if is_best else color, alpha=1.0 if is_best else alpha,
                lw=2.2 if is_best else 0.9, zorder=3 if is_best else 2)
        marker = "x" if t.state == TrialState.PRUNED else "o"
        ax.plot(xs[-1:], ys[-1:], marker, color="black" if is_best else color, ms=5 if marker == "x" else 3,
                alpha=1.0 if is_best else alpha, zorder=3)
    for k, r in enumerate(rung_epochs(min_resource, reduction_factor, epochs)):
        ax.axvline(r, color="#555555", ls="--", lw=0.7, zorder=1)
        ax.annotate(f"rung {k}", (r, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="#555555")
    # Legend entries drawn apart from the trials: the best trial is black whatever its state.
    for state in (s for s in styles if s in seen):
        color, alpha = styles[state]
        ax.plot([], [], "-", color=color, alpha=alpha, lw=0.9, label=state.name.lower())
    if best is not None:
        ax.plot([], [], "-", color="black", lw=2.2, label=f"best (trial {best})")
    if epochs > 8:  # rungs are evenly spaced on a log scale
        ax.set_xscale("log", base=reduction_factor)
    else:
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="node 0 top-1 on the validation split (%)",
           title=f"ASHA: {len(study.trials)} trials (pruned ones end in ×)")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_report(study: optuna.Study, space: SearchSpace, output: str | os.PathLike, *, min_resource: int = 1,
                 reduction_factor: int = 2, epochs: int, n_trials: Optional[int] = None, top_k: int = 3) -> str:
    """Write best_graph.json, trials.csv, the top graphs' drawings and the ASHA plot; return a summary."""
    from .draw import draw_graph

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_trials_csv(study, space, out / "trials.csv")
    ranked = ranked_trials(study)
    best = ranked[0] if ranked else None
    plot_rungs(study, out / "asha.png", min_resource=min_resource, reduction_factor=reduction_factor,
               epochs=epochs, best=best.number if best else None)

    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(1 for t in trials if t.state == s and not t.system_attrs.get(SURPLUS_KEY)) for s in TrialState}
    invalid = sum(1 for t in trials if "invalid" in t.user_attrs)
    lines = [f"study {study.study_name!r}: {counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]}"
             + (f"/{n_trials}" if n_trials else "") + f" trials finished ({counts[TrialState.COMPLETE]} complete, "
             f"{counts[TrialState.PRUNED]} pruned); {counts[TrialState.FAIL] - invalid} failed, "
             f"{invalid} invalid samples rejected, {counts[TrialState.RUNNING]} running"]
    summary: dict[str, Any] = {
        "study": study.study_name, "settings": study.user_attrs.get(SETTINGS_KEY),
        "counts": {s.name.lower(): c for s, c in counts.items()}, "invalid": invalid, "best": None, "top": []}
    draw_dir = out / "top_graphs"
    if best is None:
        lines.append("no trial has finished yet: no best graph")
    else:
        top = ranked[:max(1, top_k)]
        draw_dir.mkdir(exist_ok=True)
        for old in draw_dir.glob("rank*.png"):  # a resumed study may rank other trials now
            old.unlink(missing_ok=True)
        header = f"{'rank':>4} {'trial':>5} {'state':<8} {'top-1':>7} {'epochs':>6}  graph (* frozen)"
        lines += ["", header, "-" * len(header)]
        for rank, t in enumerate(top, 1):
            graph = trial_graph(space, t)
            value = t.value if t.value is not None else t.intermediate_values[_epochs(t)]
            draw_graph(graph, draw_dir / f"rank{rank}_trial{t.number}.png",
                       title=f"#{rank}: trial {t.number}, node 0 val top-1 {value:.2f}%")
            lines.append(f"{rank:>4} {t.number:>5} {t.state.name.lower():<8} {value:>6.2f}% {_epochs(t):>6}  "
                         f"{_graph_text(graph)}")
            summary["top"].append({"rank": rank, "trial": t.number, "state": t.state.name.lower(), "value": value,
                                   "epochs": _epochs(t), "params": dict(t.params)})
        best_graph = trial_graph(space, best)
        tmp = out / f".best_graph.{os.getpid()}.json"
        best_graph.save(tmp)
        os.replace(tmp, out / "best_graph.json")
        summary["best"] = summary["top"][0]
        lines += ["", f"best graph (trial {best.number}) → {out / 'best_graph.json'}",
                  *("  " + line for line in best_graph.describe().splitlines())]
        if best.state != TrialState.COMPLETE:
            lines.append("  (no trial completed its epochs: this is the pruned trial that got furthest)")
    _atomic_write_text(out / "search_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return "\n".join(lines)
