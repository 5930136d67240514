"""Tune workers sharing one study: the graph claim forced through the interleaving that let two
trials measure one graph, and two real worker processes, on SQLite and on a real PostgreSQL
(the storage `--storage` is for: SQLite serialises writers and hides races PostgreSQL lets
through). The PostgreSQL cluster is a throwaway one on 127.0.0.1, started here from Debian's
`postgresql` binaries (make install apt-gets them); without them those cases skip and say why."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_tune import _image_folder, _process, _study, _tune_args

PG_USER = "tuner"


def _run_as_postgres(args: list[str]) -> subprocess.CompletedProcess:
    """A server command: as the `postgres` user when we are root (initdb and postgres refuse root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, capture_output=True, text=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _postgres_cluster() -> Iterator[str]:
    """A fresh cluster listening on 127.0.0.1 only (trust auth, no socket file), removed after;
    yields its server URL without a database."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL server binaries not found in /usr/lib/postgresql (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'psycopg[binary]'")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: PostgreSQL refuses to run as root")
    bin_dir = Path(initdb[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="pitome-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off"
    try:
        made = _run_as_postgres([str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", PG_USER, "--auth=trust",
                                 "--no-sync", "-E", "UTF8"])  # fmt: skip
        assert made.returncode == 0, made.stderr[-2000:]
        started = _run_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l",
                                    str(data / "log"), "-w", "start"])  # fmt: skip
        assert started.returncode == 0, started.stdout[-2000:] + (data / "log").read_text()[-2000:]
        yield f"postgresql://{PG_USER}@127.0.0.1:{port}"
    finally:
        _run_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"])
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def _postgres_server() -> Iterator[str]:
    with _postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path) -> str:
    """A fresh, empty storage: a SQLite file, or a new database on the throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    import psycopg

    server = request.getfixturevalue("_postgres_server")
    name = f"tune_{request.node.name.split('[')[0][-40:]}_{os.getpid()}".lower()
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


MEASURED = {"top1": 0.5, "drop_points": 0.0, "drop_bound_points": 0.0, "speedup": 1.2, "latency_ms": 1.0,
            "latency_cv": 0.0, "seconds": 1.0}  # fmt: skip


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_that_looked_before_another_claimed_does_not_measure_too(storage_url, monkeypatch):
    """Two workers propose one graph. Trial A (the lower number) looks for a measurement or a
    claim and finds none; before it claims, trial B looks, claims and starts measuring. Marking
    a claim in the trial's attributes and looking again let A through too (a lower-numbered trial
    never yielded to a higher one that had passed its second look): both measured. With the
    claim taken by one insert in the storage, A waits and reuses B's measurement."""
    from pipelines.jobs.tune import study as study_module

    monkeypatch.setattr(study_module, "WAIT_SECONDS", 0.05)
    key = "pitome plain 1,1,1 fp32"
    workers = [study_module.open_study(storage_url, "s", {}, 0) for _ in range(2)]
    first, second = (opened.study.ask() for opened in workers)
    assert first.number < second.number
    for trial in (first, second):
        trial.set_user_attr("key", key)
    objectives = [study_module.Objective(None, None, 0.5, "latency", opened.claims) for opened in workers]

    looked, second_done, outcome = threading.Event(), threading.Event(), {}
    real_get_trials = workers[0].study.get_trials

    def look_then_wait(*args, **kwargs):  # A's first look returns only once B has claimed and moved on
        trials = real_get_trials(*args, **kwargs)
        if not looked.is_set():
            looked.set()
            second_done.wait(30)
        return trials

    monkeypatch.setattr(workers[0].study, "get_trials", look_then_wait)
    thread = threading.Thread(target=lambda: outcome.update(first=objectives[0]._earlier(first, key)))
    thread.start()
    assert looked.wait(30)
    outcome["second"] = objectives[1]._earlier(second, key)
    second_done.set()
    assert outcome["second"] is None  # B measures
    thread.join(0.5)
    assert thread.is_alive(), f"A did not wait for B's measurement: {outcome.get('first')}"
    for name, value in MEASURED.items():
        second.set_user_attr(name, value)
    workers[1].study.tell(second, 1.2)
    thread.join(30)
    assert not thread.is_alive() and outcome["first"] == {**MEASURED, "reused_from": second.number}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_claim_whose_trial_stopped_is_handed_to_one_waiting_trial(storage_url):
    """A claim held by a trial that ended without a measurement (pruned, failed, its worker dead)
    goes to the first trial that asks again, and to that one only; a holder that completed keeps
    it (its measurement is there to reuse)."""
    from pipelines.jobs.tune.study import open_study

    opened = open_study(storage_url, "s", {}, 0)
    holding = {0}

    def holds(number: int) -> bool:
        return number in holding

    assert opened.claims.take("g", 0, holds)
    assert not opened.claims.take("g", 1, holds)
    holding.clear()  # trial 0 was pruned
    assert opened.claims.take("g", 1, holds)
    holding.add(1)
    assert not opened.claims.take("g", 2, holds)
    assert opened.claims.take("g", 1, holds)  # its holder asking again keeps it
    assert opened.claims.take("h", 2, holds)  # another graph is claimed apart


def test_two_workers_share_one_study(tmp_path, _trace_cache, storage_url):
    from optuna.trial import TrialState

    data = _image_folder(tmp_path / "data", [0, 1] * 8)
    args = _tune_args(data, tmp_path / "unused", storage_url, 3, "--search-only")
    workers = [_process(args, _trace_cache), _process(args, _trace_cache)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-2000:]
    assert not (tmp_path / "unused").exists()  # search-only workers write no folder
    trials = _study(storage_url).trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING) for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 3 and len({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}) == 2
    measured = [t.user_attrs["key"] for t in complete if "reused_from" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no graph measured twice
    seeds = [json.dumps(t.params, sort_keys=True) for t in trials if t.user_attrs.get("seed") and t.params]
    assert len(seeds) == len(set(seeds))  # every queued uniform schedule taken by one worker


@pytest.mark.parametrize(
    ("message", "retried"),
    [("table studies already exists", True), ("unable to open database file", False)],
)
def test_a_worker_that_loses_the_schema_race_retries_and_a_bad_storage_does_not(
    monkeypatch, tmp_path, message, retried
):
    """Two workers creating one new SQLite database: the loser's CREATE TABLE fails with "already
    exists" (found by the two-worker test under load) and is retried; any other error is one line."""
    import optuna
    from sqlalchemy.exc import OperationalError

    from pipelines.jobs.tune import study as study_module

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise OperationalError("CREATE TABLE studies", {}, Exception(message))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    if retried:
        assert study_module.open_storage(url) is not None and len(calls) == 2
    else:
        with pytest.raises(study_module.StorageError, match="unable to open database file"):
            study_module.open_storage(url)
        assert len(calls) == 1
