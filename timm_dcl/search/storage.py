"""Where a study lives: Optuna storages (an embedded journal file, or any RDB URL), the study.

``--storage`` is a journal file (default ``OUTPUT/study.journal``; local processes share it
through Optuna's lock file; :mod:`.journal` cuts off a record torn by a killed writer) or a
SQLAlchemy URL for :class:`optuna.storages.RDBStorage` (PostgreSQL or MySQL for several
machines, SQLite).

Dead workers. Every running trial proves its worker alive with a heartbeat; a trial whose
heartbeat is older than the grace period is failed, so that another worker takes its slot.
RDBStorage has this built in and ``Study.optimize`` drives it. The journal storage has no
heartbeat in Optuna, so :class:`JournalHeartbeatStorage` adds one with public storage calls
only (a trial system attribute holding the time of the last beat).
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileSymlinkLock, JournalStorage
from optuna.trial import TrialState

from .journal import JournalDamagedError, SafeJournalFileBackend
from .space import SearchSpace

__all__ = ["StorageError", "JournalHeartbeatStorage", "open_storage", "make_sampler", "make_pruner",
           "rung_epochs", "open_study", "search_settings", "fail_stale", "Heartbeat", "error_text"]

SETTINGS_KEY = "timm_dcl_search"
HEARTBEAT_KEY = "timm_dcl:heartbeat"


class StorageError(RuntimeError):
    """The study storage cannot be opened or reached."""


class JournalHeartbeatStorage(JournalStorage):
    """Optuna's journal storage with a heartbeat (hand-written: Optuna gives journals none).

    A beat is a trial system attribute holding the writer's wall-clock time; the workers of
    one journal file share a file system, and in practice a clock.
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: Optional[int] = None) -> None:
        super().__init__(backend)
        if heartbeat_interval < 1:
            raise ValueError(f"--heartbeat-interval must be ≥ 1 second, got {heartbeat_interval}")
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period) if grace_period is not None else 2 * self.heartbeat_interval

    def record_beat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())

    def stale_trial_numbers(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_KEY)
            if beat is None:  # killed before its first beat: the start time is the last sign of life
                beat = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - float(beat) > self.grace_period:
                stale.append(trial.number)
        return stale


def fail_stale(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """Fail the running trials whose worker stopped beating; returns the journal's ones it failed."""
    if not isinstance(storage, JournalHeartbeatStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a no-op where the storage has no heartbeat
        return []
    failed = []
    for number in storage.stale_trial_numbers(storage.get_study_id_from_name(study.study_name)):
        try:
            study.tell(number, state=TrialState.FAIL)
            failed.append(number)
        except (UpdateFinishedTrialError, ValueError):  # another worker failed it first
            pass
    return failed


class Heartbeat:
    """Beats for one journal trial every interval on a background thread (RDB: Optuna does it)."""

    def __init__(self, storage: BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.heartbeat_interval if isinstance(storage, JournalHeartbeatStorage) else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self._beat()
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.trial_id}", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            self.storage.record_beat(self.trial_id)
        except UpdateFinishedTrialError:  # another worker failed the trial: nothing left to keep alive
            self._stop.set()
        except Exception as e:  # noqa: BLE001  (a storage hiccup: the next beat may get through)
            print(f"search: heartbeat of trial id {self.trial_id} failed: {error_text(e)}", file=sys.stderr)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _mask_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: hide anything between ':' and '@'
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def error_text(e: BaseException) -> str:
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
            # cuts a torn last record (a worker killed mid-write) that would break the next append
            backend = SafeJournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path)))
            return JournalHeartbeatStorage(backend, heartbeat_interval, grace_period)
        except JournalDamagedError as e:
            raise StorageError(str(e)) from None
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
    if dialect == "sqlite" and storage.startswith("sqlite:///") and len(storage) > len("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)  # as for a journal file
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
                               f"{error_text(e.__cause__ or e)}") from None
        except Exception as e:  # noqa: BLE001  (SQLAlchemy raises many kinds; all mean "cannot open")
            last = e
            text = error_text(e).lower()
            unreachable = any(s in text for s in ("could not connect", "connection refused", "could not translate",
                                                 "timeout expired", "name or service not known", "can't connect",
                                                 "no such", "does not exist", "password authentication",
                                                 "unable to open", "can't load plugin"))
            if unreachable or attempt == retries - 1:
                break
            # two workers creating the tables of a fresh database at once: one of them retries
            time.sleep(0.5 + attempt)
    raise StorageError(f"cannot open the study storage {masked}: {error_text(last)}") from None


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


def _recipe_defaults() -> dict[str, Any]:
    import dataclasses

    from ..config import RECIPE_FIELDS, TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return _canonical({k: defaults[k] for k in RECIPE_FIELDS if k in defaults})


#: Settings of :meth:`SearchSpace.settings` present only when True.
_MODE_KEYS = ("ensemble_target", "feature_edges", "ema_sources")


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
        raise StorageError(f"cannot create or load study {study_name!r}: {error_text(e)}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"study {study_name!r} exists in the storage but minimises; it is not a timm-dcl search")
    settings = _canonical(settings)
    stored = study.user_attrs.get(SETTINGS_KEY)
    if stored is not None:
        # A study stored before a recipe field existed ran with that field's default.
        stored = {**{k: v for k, v in _recipe_defaults().items() if k in settings}, **stored}
    if stored is None:
        study.set_user_attr(SETTINGS_KEY, settings)
    elif stored != settings:
        # the search modes are stored only when on: absent is off, and the message says so
        modes = {k: False for k in _MODE_KEYS}
        stored, settings = {**modes, **stored}, {**modes, **settings}
        diff = [f"{k}: {stored.get(k)!r} in the study, {settings.get(k)!r} now"
                for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        raise ValueError(f"study {study_name!r} was started with other settings ({'; '.join(diff)}); "
                         "resume it with the same settings, or pick another --study-name")
    return study


def search_settings(space: SearchSpace, cfg, *, min_resource: int, reduction_factor: int) -> dict[str, Any]:
    """Everything that makes trials comparable: the space, the data split, the recipe, ASHA."""
    from ..config import RECIPE_FIELDS
    return {**space.settings(), **{k: getattr(cfg, k) for k in RECIPE_FIELDS},
            "min_resource": min_resource, "reduction_factor": reduction_factor}
