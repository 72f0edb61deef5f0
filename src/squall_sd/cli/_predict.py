"""``squall predict``: predict expression for one slide or a cohort, one atomic zarr store per slide.

The slides run here one after the other, on a local dask cluster, or on a running dask cluster
(``--scheduler tcp://HOST:PORT`` / ``--scheduler-file PATH``; see ``docs/cluster.md``). A failing slide
is reported and the others go on; a rerun computes only the slides without a complete output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from squall_sd._logging import logger

#: Image files read as H&E-only slides (with ``--mpp`` when the file records no µm/px).
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".jpg", ".jpeg", ".png")
#: Marker stored in the output's ``attrs["squall"]`` once a slide is complete.
DONE_KEY = "predict_complete"
#: Seconds to wait for an existing dask scheduler to answer (``--connect-timeout``).
CONNECT_TIMEOUT = 10.0
#: Where a slide went: ``done`` (written now), ``skipped`` (output already complete) or ``failed``.
STATUSES = ("done", "skipped", "failed")


def find_slides(path: str | Path) -> list[Path]:
    """Slides under ``path``: a ``.zarr`` SpatialData or an image file, or a folder of them (sorted).

    Parameters
    ----------
    path
        A slide or a folder.

    Returns
    -------
    The slide paths.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist; pass a slide (.zarr or image file) or a folder of them.")
    if p.suffix == ".zarr" or (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        return [p]
    if p.is_dir():
        found = sorted(
            q for q in p.iterdir()
            if not q.name.startswith(".")
            and (q.suffix == ".zarr" or (q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        )
        if not found:
            raise FileNotFoundError(f"No slide (.zarr store or image {IMAGE_SUFFIXES}) found in {str(p)!r}.")
        return found
    raise ValueError(f"{str(p)!r} is not a .zarr store, an image ({', '.join(IMAGE_SUFFIXES)}) or a folder.")


def output_path(slide: Path, out_dir: Path) -> Path:
    """``OUT_DIR/<slide stem>.zarr``."""
    name = slide.name[: -len(".zarr")] if slide.name.endswith(".zarr") else slide.stem
    return out_dir / f"{name}.zarr"


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished output store (it carries the completion marker)."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return bool(attrs.get("squall", {}).get(DONE_KEY))


_MODEL_CACHE: dict[tuple, Any] = {}
_MODEL_LOCK = threading.Lock()


def _cached_model(model: Any) -> Any:
    """``model`` itself, or the model name / path loaded once per process (a dask worker reuses it for each slide).

    One model is kept at a time (a worker's GPU holds one); a path is reloaded when its files change.
    """
    if not isinstance(model, (str, Path)):
        return model
    from squall_sd.models import load

    p = Path(model).expanduser()
    stamp = None
    if p.exists():
        stamp = max([p.stat().st_mtime_ns] + ([q.stat().st_mtime_ns for q in p.iterdir()] if p.is_dir() else []))
    key = (str(model), stamp)
    with _MODEL_LOCK:  # threads of one worker load it once
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = load(str(model))
        return _MODEL_CACHE[key]


def predict_slide(slide: str | Path, out: str | Path, *, model: Any, mpp: float | None = None, overwrite: bool = False,
                  **kwargs: Any) -> str:
    """Read one slide, predict and write ``out`` atomically (:func:`squall_sd.io.write`).

    Parameters
    ----------
    slide
        ``.zarr`` SpatialData or an H&E image.
    out
        Output store.
    model
        Model or model name / path (loaded once per process).
    mpp
        µm/px of an image file that records none.
    overwrite
        Replace an existing ``out``.
    **kwargs
        Passed to :func:`squall_sd.tl.predict_expression`.

    Returns
    -------
    The output path.
    """
    import spatialdata as sd

    from squall_sd.io import he, write
    from squall_sd.tl import predict_expression

    slide, out = Path(slide), Path(out)
    sdata = sd.read_zarr(slide) if slide.suffix == ".zarr" else he(slide, mpp=mpp)
    # predict in memory (the input store is never modified), then write the whole result atomically
    predict_expression(sdata, _cached_model(model), write_to_store=False, **kwargs)
    meta = dict(sdata.attrs.get("squall", {}))
    meta[DONE_KEY] = True
    meta["source_slide"] = str(slide)
    sdata.attrs["squall"] = meta
    write(sdata, out, overwrite=overwrite)
    return str(out)


def _where() -> dict[str, Any]:
    """Where this runs: dask worker address (``None`` outside a worker), host, pid and ``CUDA_VISIBLE_DEVICES``."""
    worker = None
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        pass
    return {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _record(slide: Path | str, out: Path | str, status: str, **fields: Any) -> dict[str, Any]:
    rec = {"slide": str(slide), "output": str(out), "status": status, "error": None, "seconds": None,
           "worker": None, "host": None, "pid": None, "cuda_visible_devices": None}
    rec.update(fields)
    return rec


def _predict_task(slide: str, out: str, *, model: Any, mpp: float | None, overwrite: bool, **kwargs: Any) -> dict:
    """Predict one slide and return its report record; an error is recorded (and logged), not raised."""
    where = _where()
    t0 = time.perf_counter()
    try:
        predict_slide(slide, out, model=model, mpp=mpp, overwrite=overwrite, **kwargs)
    except Exception as e:  # one bad slide must not stop the cohort: report it
        logger.exception("predict: %s failed", slide)
        return _record(slide, out, "failed", error=f"{type(e).__name__}: {e}",
                       seconds=round(time.perf_counter() - t0, 3), **where)
    return _record(slide, out, "done", seconds=round(time.perf_counter() - t0, 3), **where)


def is_address(text: str) -> bool:
    """Whether ``text`` looks like a dask scheduler address (``tcp://HOST:PORT``, ``tls://...`` or ``HOST:PORT``)."""
    return "://" in text or re.fullmatch(r"[\w.\-]+:\d+", text) is not None


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ImportError(
            "A dask cluster needs dask.distributed: pip install 'dask[distributed]' (or use --scheduler sync)."
        ) from None
    return distributed


def read_scheduler_file(path: str | Path) -> str:
    """Read the scheduler address from a dask scheduler file (``dask scheduler --scheduler-file PATH``).

    Parameters
    ----------
    path
        The scheduler file (JSON).

    Returns
    -------
    The address, e.g. ``"tcp://10.0.0.5:8786"``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"Scheduler file {str(p)!r} does not exist; start the scheduler with "
            f"`dask scheduler --scheduler-file {p}` first (on a cluster the path must be on a filesystem this "
            "machine shares), or pass its address with --scheduler tcp://HOST:PORT."
        )
    try:
        address = json.loads(p.read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{str(p)!r} is not a dask scheduler file (JSON with an 'address', as written by "
            "`dask scheduler --scheduler-file PATH`)."
        ) from None
    if not isinstance(address, str) or not address:
        raise ValueError(f"The scheduler file {str(p)!r} records no address; restart `dask scheduler`.")
    return address


def connect(address: str | None = None, *, scheduler_file: str | Path | None = None,
            timeout: float = CONNECT_TIMEOUT) -> Any:
    """Connect a :class:`dask.distributed.Client` to an existing scheduler (close it with ``client.close()``).

    Parameters
    ----------
    address
        ``tcp://HOST:PORT`` of a running ``dask scheduler``.
    scheduler_file
        Or the scheduler file it wrote (``dask scheduler --scheduler-file PATH``).
    timeout
        Seconds to wait for the scheduler.

    Returns
    -------
    The client. Closing it leaves the cluster running.
    """
    if (address is None) == (scheduler_file is None):
        raise ValueError("Pass the scheduler's address or its scheduler file (one of them).")
    Client = _distributed().Client
    origin = ""
    if scheduler_file is not None:
        address = read_scheduler_file(scheduler_file)
        origin = (f" (read from the scheduler file {str(scheduler_file)!r}; the file stays behind when its "
                  "scheduler stops, so it may be stale)")
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise ConnectionError(
            f"Could not reach a dask scheduler at {address!r}{origin} within {timeout:g} s ({type(e).__name__}: "
            f"{e}). Check that `dask scheduler` is running, that the address and port are the ones it printed "
            "('Scheduler at: tcp://HOST:PORT'), and that this machine can reach that host and port (firewall, the "
            "cluster's internal hostname); raise --connect-timeout on a slow network."
        ) from None
    if not client.scheduler_info().get("workers"):
        logger.warning(
            "the dask scheduler at %s has no worker yet: slides wait until one joins "
            "(`dask worker %s --nthreads 1`, one per GPU)", address, address,
        )
    return client


def failure_message(records: Sequence[dict]) -> str:
    """List the failed slides of a report, one a line, and what to do next."""
    failed = [r for r in records if r["status"] == "failed"]
    ok = sum(r["status"] != "failed" for r in records)
    lines = [f"{len(failed)} of {len(records)} slide(s) failed (the other {ok} are complete):"]
    lines += [f"  {Path(r['slide']).name}: {r['error']}" + (f" [on {r['worker']}]" if r["worker"] else "")
              for r in failed]
    lines.append("Fix or remove them and rerun the same command: complete outputs are skipped.")
    return "\n".join(lines)


class SlidesFailedError(RuntimeError):
    """Some slides failed (the others were written); ``records`` is the report of :func:`predict_slides`."""

    def __init__(self, records: list[dict]):
        super().__init__(failure_message(records))
        self.records = records


def predict_slides(
    slides: str | Path,
    out_dir: str | Path,
    *,
    model: Any,
    scheduler: str = "sync",
    scheduler_file: str | Path | None = None,
    n_workers: int = 2,
    connect_timeout: float = CONNECT_TIMEOUT,
    mpp: float | None = None,
    overwrite: bool = False,
    client: Any = None,
    report: str | Path | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Predict every slide into ``out_dir`` and report each one; complete outputs are skipped (resumable).

    A slide that fails is reported and the others go on. Outputs are written atomically and marked
    complete last (:func:`is_complete`), so after a killed run (or a lost worker) the same call
    recomputes only the slides without a complete output.

    **A dask cluster.** ``scheduler`` is the address of a running ``dask scheduler`` (or pass
    ``scheduler_file``); each slide is one task, run by ``predict_slide`` on a worker, which loads
    ``model`` once. The workers need squall-sd installed and must see the slides, the model and
    ``out_dir`` at the same paths (a shared filesystem; relative paths are made absolute here).
    Only the client is closed at the end: a cluster this function did not start keeps running.
    For one GPU per worker start one ``dask worker --nthreads 1`` per GPU with
    ``CUDA_VISIBLE_DEVICES`` set to that GPU (see ``docs/cluster.md``: SLURM, dask-jobqueue).

    Parameters
    ----------
    slides
        A slide or a folder of slides.
    out_dir
        Output folder (created).
    model
        Model name or path (loaded once per process), or a loaded model.
    scheduler
        ``"sync"`` (one after the other, here), ``"local"`` (a :class:`dask.distributed.LocalCluster` of
        ``n_workers``, closed at the end) or the address of a running scheduler (``"tcp://HOST:8786"``).
    scheduler_file
        A dask scheduler file (``dask scheduler --scheduler-file PATH``) instead of an address.
    n_workers
        Workers of the local cluster.
    connect_timeout
        Seconds to wait for an existing scheduler.
    mpp
        µm/px of image files that record none.
    overwrite
        Recompute complete outputs too.
    client
        An existing :class:`dask.distributed.Client` to use (left open).
    report
        Also write the report to this JSON file.
    **kwargs
        Passed to :func:`squall_sd.tl.predict_expression`. On dask workers ``num_workers="auto"`` is 0
        (worker processes may not start DataLoader processes of their own).

    Returns
    -------
    One record per slide, in slide order: ``slide``, ``output``, ``status`` (``"done"``, ``"skipped"``,
    ``"failed"``), ``error``, ``seconds`` and where it ran (``worker`` address, ``host``, ``pid``,
    ``cuda_visible_devices``).
    """
    remote = is_address(scheduler)
    if scheduler_file is not None:
        if scheduler != "sync":
            raise ValueError(f"Pass a scheduler address or a scheduler file, not both (found {scheduler!r} and "
                             f"{str(scheduler_file)!r}).")
        remote = True
    elif scheduler not in ("sync", "local") and not remote:
        raise ValueError(f"`scheduler` must be 'sync', 'local' or a dask scheduler address (tcp://HOST:PORT), found "
                         f"{scheduler!r}.")
    if client is not None and remote:
        raise ValueError("Pass `client` or a scheduler address / scheduler file, not both.")
    found = find_slides(slides)
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))  # workers may run in another directory
    out_dir.mkdir(parents=True, exist_ok=True)
    records: dict[Path, dict] = {}
    todo = []
    for s in found:
        s = Path(os.path.abspath(s))
        o = output_path(s, out_dir)
        if o.exists() and is_complete(o) and not overwrite:
            logger.info("skip %s: %s is complete", s.name, o)
            records[s] = _record(s, o, "skipped")
            continue
        records[s] = None
        todo.append((s, o, o.exists()))
    logger.info("predict: %d slide(s), %d to do", len(found), len(todo))
    distributed = scheduler != "sync" or scheduler_file is not None or client is not None
    kwargs.setdefault("progress", not distributed)
    if distributed:
        # dask workers are often daemon processes (under a nanny), which may not start DataLoader workers
        kwargs["num_workers"] = 0 if kwargs.get("num_workers", "auto") == "auto" else kwargs["num_workers"]
    if isinstance(model, Path) or (isinstance(model, str) and Path(model).expanduser().exists()):
        model = os.path.abspath(Path(model).expanduser())
    if todo and not distributed:
        from squall_sd.models import load

        m = load(model) if isinstance(model, str) else model  # once for the cohort, not kept afterwards
        for s, o, exists in todo:
            records[s] = _predict_task(str(s), str(o), model=m, mpp=mpp, overwrite=exists, **kwargs)
    elif todo:
        _run_distributed(todo, records, client=client, scheduler=scheduler, scheduler_file=scheduler_file,
                         n_workers=n_workers, connect_timeout=connect_timeout, model=model, mpp=mpp, **kwargs)
    out = list(records.values())
    n = {st: sum(r["status"] == st for r in out) for st in STATUSES}
    logger.info("predict: %d done, %d skipped (complete), %d failed", n["done"], n["skipped"], n["failed"])
    if report is not None:
        _write_report(out, Path(report).expanduser())
    return out


def _run_distributed(todo: list, records: dict, *, client: Any, scheduler: str, scheduler_file: Any, n_workers: int,
                     connect_timeout: float, model: Any, mpp: float | None, **kwargs: Any) -> None:
    """Submit one task per slide and fill ``records`` as they finish."""
    own_client, cluster = client is None, None
    if client is None:
        if scheduler == "local" and scheduler_file is None:
            d = _distributed()
            cluster = d.LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True)
            client = d.Client(cluster, set_as_default=False)
        elif scheduler_file is not None:
            client = connect(scheduler_file=scheduler_file, timeout=connect_timeout)
        else:
            client = connect(scheduler, timeout=connect_timeout)
    try:
        from distributed import as_completed

        if not isinstance(model, str):  # send a loaded model to each worker once, not with every task
            model = client.scatter(model, broadcast=True)
        futures = {}
        for s, o, exists in todo:
            fut = client.submit(_predict_task, str(s), str(o), model=model, mpp=mpp, overwrite=exists, pure=False,
                                key=f"squall-predict-{s.name}-{uuid.uuid4().hex[:8]}", **kwargs)
            futures[fut] = (s, o)
        for fut in as_completed(futures, loop=client.loop):
            s, o = futures[fut]
            try:
                rec = fut.result()
            except (Exception, asyncio.CancelledError) as e:  # the task did not finish: lost worker, cancelled, ...
                rec = _record(s, o, "failed", error=f"{type(e).__name__}: {e}")
            if rec["status"] == "failed":
                logger.error("predict: %s failed on %s: %s", s.name, rec["worker"] or "the cluster", rec["error"])
            else:
                logger.info("predict: %s done on %s in %.1f s", s.name, rec["worker"], rec["seconds"])
            records[s] = rec
    finally:
        if own_client:
            client.close()  # only the client: a cluster we connected to keeps running
        if cluster is not None:
            cluster.close()


def _write_report(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"slides": records}, indent=1))
    tmp.replace(path)


def run_predict(slides: str | Path, out_dir: str | Path, *, model: Any, **kwargs: Any) -> list[str]:
    """Predict every slide into ``out_dir``; slides whose output is complete are skipped (resumable).

    :func:`predict_slides` returning the written paths: ``**kwargs`` are its options.

    Returns
    -------
    The written output paths (skipped ones excluded).

    Raises
    ------
    SlidesFailedError
        When slides failed, after the others were written (its ``records`` is the full report).
    """
    records = predict_slides(slides, out_dir, model=model, **kwargs)
    if any(r["status"] == "failed" for r in records):
        raise SlidesFailedError(records)
    return [r["output"] for r in records if r["status"] == "done"]


def _workers(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _scheduler(text: str) -> str:
    if text in ("sync", "local") or is_address(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not 'sync', 'local' or a dask scheduler address such as tcp://HOST:8786"
    )


def add_predict_parser(sub: Any) -> None:
    """Register ``squall predict`` on the sub-parsers ``sub``."""
    p = sub.add_parser(
        "predict", help="predict expression from H&E for a slide or a folder of slides",
        description="Predict expression for a slide or a folder of slides: one atomic <slide>.zarr per slide. "
        "Complete outputs are skipped (rerun the same command to resume) and a failing slide does not stop the "
        "others (exit code 1 lists them). With --scheduler tcp://HOST:PORT or --scheduler-file PATH the slides run "
        "on an existing dask cluster (one `dask worker --nthreads 1` per GPU, CUDA_VISIBLE_DEVICES set to it), "
        "which keeps running afterwards.",
    )
    p.add_argument("slides", help="a SpatialData .zarr, an H&E image, or a folder of them")
    p.add_argument("--model", required=True, help="model name (squall.models.list_models) or path")
    p.add_argument("--out", required=True, help="output folder: one <slide>.zarr per slide")
    p.add_argument("--scheduler", type=_scheduler, default=None, metavar="{sync,local,tcp://HOST:PORT}",
                   help="sync (default), a local dask cluster, or the address of a running `dask scheduler`")
    p.add_argument("--scheduler-file", default=None, metavar="PATH",
                   help="scheduler file of a running `dask scheduler --scheduler-file PATH` (instead of --scheduler)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT, metavar="S",
                   help="seconds to wait for an existing scheduler (default: %(default)s)")
    p.add_argument("--n-workers", type=int, default=2, help="workers of --scheduler local (default: %(default)s)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="write a report: status, error, time and dask worker of each slide")
    p.add_argument("--mpp", type=float, default=None, help="µm/px of image files that record none")
    p.add_argument("--spots", choices=["visium", "bins", "tiles"], default=None, help="virtual spots (H&E only)")
    p.add_argument("--spot-size-um", type=float, default=None, help="virtual spot diameter / edge in µm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=_workers, default="auto",
                   help="DataLoader workers per slide (default: auto, 0 on CPU; 0 on dask workers)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dense-genes", nargs="*", default=None, help="genes to write as dense maps")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: mean over the 8 rotations / mirror images of each tile (8x compute)")
    p.add_argument("--overwrite", action="store_true", help="recompute slides whose output is complete")
    p.set_defaults(func=_predict_cmd)


def _predict_cmd(args: argparse.Namespace) -> int:
    if args.scheduler is not None and args.scheduler_file is not None:
        raise ValueError("Pass --scheduler or --scheduler-file, not both.")
    records = predict_slides(
        args.slides, args.out, model=args.model, scheduler=args.scheduler or "sync",
        scheduler_file=args.scheduler_file, n_workers=args.n_workers, connect_timeout=args.connect_timeout,
        mpp=args.mpp, overwrite=args.overwrite, report=args.report, spots=args.spots,
        spot_size_um=args.spot_size_um, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, dense_genes=args.dense_genes, tta=args.tta,
    )
    logger.info("predict: wrote %d store(s)", sum(r["status"] == "done" for r in records))
    if any(r["status"] == "failed" for r in records):
        sys.stderr.write(f"squall predict: error: {failure_message(records)}\n")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    """Run ``squall predict`` alone."""
    parser = argparse.ArgumentParser(prog="squall")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
