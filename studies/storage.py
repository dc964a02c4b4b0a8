"""Where studies live: a journal file under BENCH_HOME, or an RDB server for cluster workers.

The journal (`<home>/optuna/journal.log`) is an append-only log guarded by a file lock, so several
local worker processes can share one study without a server; Optuna's FAQ advises it over SQLite
for parallel optimisation. It has no heartbeat: `studies.run` recovers the trials of dead local
workers itself (their pid is recorded on the trial). An RDB URL (`postgresql+psycopg://...`) adds
Optuna's heartbeat, so a worker on another machine that dies leaves a trial that the next worker
fails and re-queues (`RetryHeartbeatStaleTrialCallback`).
"""

from __future__ import annotations

from pathlib import Path

import optuna

from core.errors import BenchError, first_line

JOURNAL = "optuna/journal.log"
# A trial whose worker has not beaten for GRACE_S seconds is stale (RDB storages only).
HEARTBEAT_S = 60
GRACE_S = 180
MAX_RETRY = 3


def journal_path(home: Path) -> Path:
    return Path(home) / JOURNAL


def default_url(home: Path) -> str:
    """The journal file as a storage 'URL' (what `bench ui` and the workers are given)."""
    return str(journal_path(home).resolve())


def is_rdb(url: str) -> bool:
    return "://" in url


def open_storage(home: Path, url: str | None = None) -> optuna.storages.BaseStorage:
    """Journal file (default, or `url` a file path) or RDB storage (`url` with a scheme)."""
    url = url or default_url(home)
    if not is_rdb(url):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open(O_EXCL) lock works on NFS too, where symlink locks are unreliable.
        try:  # replaying the journal: a damaged one fails here, not deep in a study
            storage = optuna.storages.JournalStorage(JournalFileBackend(str(path),
                                                                        lock_obj=JournalFileOpenLock(str(path))))
            storage.get_all_studies()
        except Exception as err:  # JSON, replay assertions, missing keys: optuna has no error of its own
            first = first_line(err, 160)
            raise BenchError(f"Optuna journal {path} cannot be read ({type(err).__name__}: {first}); it is damaged "
                             f"(edited, or cut short by a full disk). Move it aside (mv {path} {path}.damaged) and "
                             "rerun: the studies start again, their trained cells come from the cell cache") from None
        return storage
    if url.startswith("sqlite"):
        raise BenchError(f"storage {url}: SQLite is not safe for parallel trials; omit --storage to use the "
                         "journal file under BENCH_HOME, or give a postgresql:// URL")
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    import warnings

    try:
        with warnings.catch_warnings():  # heartbeat_interval is "experimental" since Optuna 2.9, and stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_S,
                              grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except ImportError as err:
        raise BenchError(f"storage {url}: the database driver is missing ({err.name}); "
                         "pip install 'psycopg[binary]' for postgresql+psycopg:// URLs") from None
    except Exception as err:  # sqlalchemy's OperationalError and friends: a server that is not there
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"storage {url}: cannot connect ({first}); check the URL and that the server runs") from None
