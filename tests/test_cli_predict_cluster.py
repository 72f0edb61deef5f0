"""`squall predict` on a real dask cluster: a `dask scheduler` and two `dask worker` processes on loopback.

Slides are spread over both workers, a bad slide is reported while the others finish, a rerun recomputes only
the slides without a complete output (--scheduler-file), the cluster keeps running afterwards, and an
unreachable scheduler fails fast with a message saying what to check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("distributed") is None or importlib.util.find_spec("distributed.cli.dask_worker") is None:
    pytest.skip("dask.distributed and its CLI (`dask scheduler`, `dask worker`) are not installed: "
                "pip install 'dask[distributed]'", allow_module_level=True)


from squall_sd.cli import main  # noqa: E402
from squall_sd.cli._predict import DONE_KEY, is_complete, predict_slides  # noqa: E402

GOOD = ("s1", "s2", "s3", "s4")
STARTUP_TIMEOUT = 60


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, write_tiny_cohort):
    """Four tiny slides (4 spots each of the bundled example), one unreadable slide and a saved tiny model."""
    parts = {name: slice(4 * i, 4 * i + 4) for i, name in enumerate(GOOD)}
    slides, model = write_tiny_cohort(tmp_path_factory.mktemp("cluster_cohort"), parts)
    bad = slides / "bad.zarr"  # a store that is not SpatialData
    bad.mkdir()
    (bad / "zarr.json").write_text("this is not zarr metadata")
    return slides, model


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A `dask scheduler` (free loopback port, scheduler file) and two single-threaded `dask worker` processes.

    Yields ``(address, scheduler_file)``; the processes are terminated at the end, also when a test (or this
    fixture's startup) fails.
    """
    from distributed import Client

    root = tmp_path_factory.mktemp("dask_cluster")
    sched_file = root / "scheduler.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, *args: str) -> None:
        log = root / f"{name}.log"
        logs.append(log)
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=fh, stderr=subprocess.STDOUT,
                                          env=env, cwd=root))

    def fail(msg: str) -> None:
        pytest.fail(msg + "\n" + "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs))

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(sched_file))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        address = None
        while address is None:
            if procs[0].poll() is not None:
                fail("`dask scheduler` exited")
            if time.monotonic() > deadline:
                fail("`dask scheduler` wrote no scheduler file in time")
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        for i in range(2):
            start(f"worker{i}", "worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--nworkers", "1",
                  "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}")
        with Client(address, timeout=20, set_as_default=False) as client:
            try:
                client.wait_for_workers(2, timeout=STARTUP_TIMEOUT)
            except TimeoutError:
                fail("the two `dask worker` processes did not join in time")
        yield address, sched_file
    finally:
        _stop(procs[1:])  # workers first, then the scheduler
        _stop(procs[:1])


def _workers_alive(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=20, set_as_default=False) as client:
        return len(client.scheduler_info()["workers"])


def test_predict_on_dask_cluster_spreads_reports_and_resumes(cohort, dask_cluster, tmp_path, capsys):
    slides, model = cohort
    address, sched_file = dask_cluster
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    args = ["predict", str(slides), "--model", str(model), "--out", str(out), "--report", str(report)]

    # 1. by address: the bad slide is reported (exit code 1), the others are written, on both workers
    assert main([*args, "--scheduler", address]) == 1
    err = capsys.readouterr().err
    assert "1 of 5 slide(s) failed" in err and "bad.zarr" in err and "rerun the same command" in err
    recs = {Path(r["slide"]).name: r for r in json.loads(report.read_text())["slides"]}
    assert recs["bad.zarr"]["status"] == "failed" and recs["bad.zarr"]["error"]
    for name in GOOD:
        assert recs[f"{name}.zarr"]["status"] == "done", recs[f"{name}.zarr"]
        assert is_complete(out / f"{name}.zarr")
    assert not (out / "bad.zarr").exists()
    workers = {r["worker"] for r in recs.values()}
    assert len(workers) == 2 and all(w and w.startswith("tcp://127.0.0.1:") for w in workers), workers
    assert len({r["pid"] for r in recs.values()}) == 2 and os.getpid() not in {r["pid"] for r in recs.values()}
    # only our client was closed: the cluster runs on
    assert _workers_alive(address) == 2

    # 2. a killed run: s2's output is gone, s3's is a store without the completion marker
    mtimes = {n: (out / f"{n}.zarr" / "zarr.json").stat().st_mtime_ns for n in ("s1", "s4")}
    shutil.rmtree(out / "s2.zarr")
    meta_path = out / "s3.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["squall"][DONE_KEY]
    meta_path.write_text(json.dumps(meta))
    assert not is_complete(out / "s3.zarr")

    # 3. rerun with --scheduler-file: only s2 and s3 are computed, the bad slide is reported again
    assert main([*args, "--scheduler-file", str(sched_file)]) == 1
    assert "bad.zarr" in capsys.readouterr().err
    recs = {Path(r["slide"]).name: r for r in json.loads(report.read_text())["slides"]}
    assert {n: r["status"] for n, r in recs.items()} == {
        "bad.zarr": "failed", "s1.zarr": "skipped", "s2.zarr": "done", "s3.zarr": "done", "s4.zarr": "skipped"}
    assert recs["s1.zarr"]["worker"] is None and recs["s2.zarr"]["worker"].startswith("tcp://127.0.0.1:")
    assert all(is_complete(out / f"{n}.zarr") for n in GOOD)
    assert {n: (out / f"{n}.zarr" / "zarr.json").stat().st_mtime_ns for n in ("s1", "s4")} == mtimes
    assert _workers_alive(address) == 2

    # 4. the Python API, with the good slides only: everything is complete, nothing runs
    recs = predict_slides(slides / "s1.zarr", out, model=str(model), scheduler=address)
    assert [r["status"] for r in recs] == ["skipped"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_unreachable_scheduler_fails_fast(cohort, tmp_path, capsys):
    slides, model = cohort
    args = ["predict", str(slides / "s1.zarr"), "--model", str(model), "--out", str(tmp_path / "out")]
    t0 = time.monotonic()
    assert main([*args, "--scheduler", f"tcp://127.0.0.1:{_free_port()}", "--connect-timeout", "2"]) == 2
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert "Could not reach a dask scheduler" in err and "`dask scheduler` is running" in err and "port" in err

    assert main([*args, "--scheduler-file", str(tmp_path / "missing.json")]) == 2
    assert "dask scheduler --scheduler-file" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert main([*args, "--scheduler-file", str(tmp_path / "junk.json")]) == 2
    assert "is not a dask scheduler file" in capsys.readouterr().err
    assert main([*args, "--scheduler", "tcp://127.0.0.1:1", "--scheduler-file", str(tmp_path / "junk.json")]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--scheduler", "bogus"])
    assert "dask scheduler address" in capsys.readouterr().err
