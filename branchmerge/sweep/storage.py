"""Where an Optuna study lives, by URL, and the two things several workers need from it: a lock
around claiming a trial, and heartbeats so a killed worker's trial is failed and retried.

    sqlite:///outputs/sweeps/x/optuna.db            one machine (the default)
    journal:///shared/fs/sweeps/x/optuna.journal    a file on a shared file system (NFS, Lustre)
    postgresql://user:pass@host:5432/db            a server every node reaches (also mysql://...)

Heartbeats: a worker records one every `heartbeat_interval` seconds for each trial it runs; a
RUNNING trial whose last heartbeat is older than `grace_period` belongs to a dead worker: the next
worker to claim a trial marks it FAIL and enqueues a copy (same parameters, WAITING) unless it has
already been retried `max_retry` times. RDB storages use Optuna's heartbeat table (server clock);
the journal has none, so its beats are a trial system attribute (the workers' clocks: keep
`grace_period` well above their skew).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
BEAT_ATTR = "bm:heartbeat"  # journal storage: unix time of the trial's last heartbeat
JOURNAL = "journal:"
LOCK_STALE_S = 120  # a claim lock file older than this was left by a killed worker


def journal_path(url: str) -> Path:
    """`journal:///abs/path` or `journal:rel/path` -> the journal file's path."""
    rest = url[len(JOURNAL) :]
    return Path(rest[2:] if rest.startswith("//") else rest)


def sqlalchemy_url(url: str) -> str:
    """`postgresql://` names the driver this environment has (psycopg 3, the dev extra's, before
    psycopg2): SQLAlchemy 2.0 and 2.1 default to different ones."""
    if url.startswith("postgresql://"):
        import importlib.util

        for driver in ("psycopg", "psycopg2"):
            if importlib.util.find_spec(driver) is not None:
                return f"postgresql+{driver}://" + url[len("postgresql://") :]
    return url


def retry_callback(max_retry: int) -> Any:
    """Optuna's callback that re-enqueues a failed stale trial (renamed in Optuna 4.9)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return (cls or optuna.storages.RetryFailedTrialCallback)(max_retry=max_retry)


def open_storage(url: str, heartbeat_interval: int, grace_period: int, max_retry: int) -> Any:
    """The Optuna storage behind `url`, with heartbeats (interval, grace in seconds) and retries."""
    import optuna

    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    if url.split(":", 1)[0].split("+")[0] not in ("sqlite", "postgresql", "mysql", "oracle", "mssql"):
        raise ValueError(
            f"hydra.sweeper.storage={url!r}: use sqlite:///file.db, journal:///shared/file.journal, "
            "postgresql://user:pass@host/db or mysql://user:pass@host/db"
        )
    callback_kw = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
        else "failed_trial_callback"
    )
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    kw = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    kw[callback_kw] = retry_callback(max_retry)
    return _create_rdb(sqlalchemy_url(url), engine_kwargs, kw)


def _create_rdb(url: str, engine_kwargs: dict, kw: dict, attempts: int = 8) -> Any:
    """RDBStorage(url), tolerating workers that start at once on an empty database: the first to
    create the schema wins, the others' CREATE TYPE / CREATE TABLE fail with an integrity or
    operational error and succeed on a retry, when the schema exists."""
    import random
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kw)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _native(storage: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def beat(storage: Any, trial_id: int) -> None:
    """Record that the trial's worker is alive."""
    if _native(storage):
        storage.record_heartbeat(trial_id)
    else:
        storage.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())


@contextmanager
def heartbeats(storage: Any, trial_ids: list[int], interval: float) -> Iterator[None]:
    """Beat for `trial_ids` every `interval` seconds while the block runs (a daemon thread)."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            for tid in trial_ids:
                try:
                    beat(storage, tid)
                except Exception as e:  # a missed beat is retried; the trial goes on
                    log.warning("heartbeat for trial id %s failed: %s", tid, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name="bm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale(study: Any, grace_period: float, max_retry: int) -> list[int]:
    """Fail the RUNNING trials whose worker stopped beating and enqueue their retries; returns the
    numbers of the trials failed here."""
    import optuna
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    if _native(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    else:
        _fail_stale_journal(study, grace_period, max_retry)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    failed = sorted(after - before)
    for n in failed:
        log.warning("trial %d: its worker stopped sending heartbeats; marked failed (retry enqueued)", n)
    return failed


def _fail_stale_journal(study: Any, grace_period: float, max_retry: int) -> None:
    import optuna
    from optuna.trial import TrialState

    storage, now = study._storage, time.time()
    callback = retry_callback(max_retry)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.system_attrs.get(BEAT_ATTR, t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last <= grace_period:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                callback(study, storage.get_trial(t._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue


@contextmanager
def claim_lock(url: str, study_name: str) -> Iterator[None]:
    """Serialise trial claims across every worker of a study: a PostgreSQL/MySQL advisory lock
    (released by the server if the worker dies), else a lock file beside the SQLite/journal file
    (created with O_EXCL, safe on NFS; one older than LOCK_STALE_S is taken over)."""
    scheme = url.split(":", 1)[0].split("+")[0]
    if scheme in ("postgresql", "mysql"):
        with _server_lock(url, scheme, study_name):
            yield
        return
    from optuna.storages.journal import JournalFileOpenLock

    path = journal_path(url) if url.startswith(JOURNAL) else Path(url.split(":///", 1)[-1])
    lock = JournalFileOpenLock(f"{path}.claim", grace_period=LOCK_STALE_S)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _server_lock(url: str, scheme: str, study_name: str) -> Iterator[None]:
    import zlib

    import sqlalchemy

    key = zlib.crc32(f"branchmerge:{study_name}".encode()) & 0x7FFFFFFF
    engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool)
    take, give = {
        "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"),
        "mysql": ("SELECT GET_LOCK(CONCAT('bm', :k), 600)", "SELECT RELEASE_LOCK(CONCAT('bm', :k))"),
    }[scheme]
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(take), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(give), {"k": key})
    finally:
        engine.dispose()
