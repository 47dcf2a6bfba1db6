"""Two `tune` workers against a real PostgreSQL server on loopback (Debian's postgresql, started here in tmp_path
as the unprivileged `postgres` user: the server refuses to run as root) complete one study without duplicates.
Skips locally without PostgreSQL, saying why; under CI=true (.ci/run installs it) a missing server fails."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="the tune extra is not installed (pip install -e .[tune])")
pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e .[tune])")

from test_tune import BASE, make_data  # noqa: E402


def _unavailable(why: str):
    (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(
        f"{why} (Debian: apt-get install postgresql; CI installs it with .ci/install-postgres)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path_factory):
    """postgresql://postgres@127.0.0.1:PORT/tune on a server of its own; stopped at the end."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not bins:
        _unavailable("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    bindir = Path(bins[-1]).parent
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd
            pwd.getpwnam("postgres")
        except KeyError:
            runuser = None
        if runuser is None:
            _unavailable("running as root without runuser or a postgres user to start the server as")
        as_user = [runuser, "-u", "postgres", "--"]
    if as_user:  # pytest's own tmp dirs are private to root: the server's directory lives beside them
        import pwd
        base = Path(tempfile.mkdtemp(prefix="convnext-fast-pg-"))
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    else:
        base = tmp_path_factory.mktemp("pg")
    data = base / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    port = _free_port()
    log = base / "server.log"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                    f"-h 127.0.0.1 -p {port} -k {base}", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "tune"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/tune"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        if as_user:
            shutil.rmtree(base, ignore_errors=True)


def test_two_workers_against_a_real_postgresql_complete_one_study(postgres, tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "study"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "convnext_fast.cli", "tune", str(data), "--out", str(out),
                        "--storage", postgres, "--workers", "2", "--trials", "3", "--trial-epochs", "2",
                        "--finalists", "1", *BASE], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="convnext-fast", storage=postgres.replace("postgresql:", "postgresql+psycopg2:"))
    trials = [t for t in study.trials if not t.user_attrs.get("stray")]
    assert len([t for t in trials if t.user_attrs["stage"] == 1]) == 3
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(dirs) == len(set(dirs))
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials from the server
    assert any(t.user_attrs["stage"] == 2 for t in trials) and (out / "best.toml").exists()
    assert time.time() - t0 < 600
