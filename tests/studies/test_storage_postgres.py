"""Acceptance 2 (RDB): a study on a PostgreSQL server that the test starts on 127.0.0.1.

Skipped with the reason when the server binaries or the psycopg driver are missing; .ci/run
installs Debian's postgresql and `psycopg[binary]`.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from optuna.trial import TrialState


def _binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres_url():
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed: pip install 'psycopg[binary]'")
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    root.chmod(0o755)
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(as_user + [initdb, "-D", str(data), "-A", "trust", "-U", "bench", "--no-sync"], check=True,
                   capture_output=True)
    start = subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
                                      f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                           capture_output=True, text=True)
    if start.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {start.stderr.strip() or start.stdout.strip()}")
    try:
        yield f"postgresql+psycopg://bench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_study_on_postgresql_with_heartbeat(tmp_path, tiny, postgres_url):
    from studies.definitions import figure5_defs
    from studies.run import load_study, run_study
    from studies.storage import HEARTBEAT_S, open_storage

    storage = open_storage(tmp_path, postgres_url)
    assert storage.heartbeat_interval == HEARTBEAT_S and storage.get_heartbeat_interval() == HEARTBEAT_S
    defs, _ = figure5_defs("demo", tiny, 1, [0.5])
    defn = next(d for d in defs if d.curve == "ubteacher")
    study = run_study(defn, tmp_path, storage_url=postgres_url, track=False, log=lambda *_: None)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    again, loaded = load_study(defn.name, tmp_path, postgres_url)  # a worker on another machine
    assert loaded == defn and again.trials[0].user_attrs["cell_key"] == study.trials[0].user_attrs["cell_key"]
    assert not (tmp_path / "optuna" / "journal.log").exists()  # nothing went to the journal
