"""``squall predict``: predict expression for one slide or a cohort, one atomic zarr store per slide."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from squall_sd._logging import logger

#: Image files read as H&E-only slides (with ``--mpp`` when the file records no µm/px).
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".jpg", ".jpeg", ".png")
#: Marker stored in the output's ``attrs["squall"]`` once a slide is complete.
DONE_KEY = "predict_complete"


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
        Model or model name / path.
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
    predict_expression(sdata, model, write_to_store=False, **kwargs)
    meta = dict(sdata.attrs.get("squall", {}))
    meta[DONE_KEY] = True
    meta["source_slide"] = str(slide)
    sdata.attrs["squall"] = meta
    write(sdata, out, overwrite=overwrite)
    return str(out)


def run_predict(
    slides: str | Path,
    out_dir: str | Path,
    *,
    model: str,
    scheduler: str = "sync",
    n_workers: int = 2,
    mpp: float | None = None,
    overwrite: bool = False,
    client: Any = None,
    **kwargs: Any,
) -> list[str]:
    """Predict every slide into ``out_dir``; slides whose output is complete are skipped (resumable).

    Parameters
    ----------
    slides
        A slide or a folder of slides.
    out_dir
        Output folder (created).
    model
        Model name or path (loaded once per process).
    scheduler
        ``"sync"`` (one after the other) or ``"local"`` (a :class:`dask.distributed.LocalCluster`).
    n_workers
        Workers of the local cluster.
    mpp
        µm/px of image files that record none.
    overwrite
        Recompute complete outputs too.
    client
        An existing :class:`dask.distributed.Client` to use instead of starting a cluster.
    **kwargs
        Passed to :func:`squall_sd.tl.predict_expression`.

    Returns
    -------
    The written output paths (skipped ones excluded).
    """
    found = find_slides(slides)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for s in found:
        o = output_path(s, out_dir)
        if o.exists() and is_complete(o) and not overwrite:
            logger.info("skip %s: %s is complete", s.name, o)
            continue
        todo.append((s, o, o.exists()))
    logger.info("predict: %d slide(s), %d to do", len(found), len(todo))
    if scheduler not in ("sync", "local"):
        raise ValueError(f"`scheduler` must be 'sync' or 'local', found {scheduler!r}.")
    kwargs.setdefault("progress", scheduler == "sync")
    if scheduler == "local" or client is not None:
        # dask workers are daemon processes, which may not start DataLoader workers of their own
        kwargs["num_workers"] = 0 if kwargs.get("num_workers", "auto") == "auto" else kwargs["num_workers"]
    if scheduler == "sync" and client is None:
        from squall_sd.models import load

        m = load(model) if isinstance(model, str) else model
        return [predict_slide(s, o, model=m, mpp=mpp, overwrite=exists, **kwargs) for s, o, exists in todo]
    own = client is None
    if own:
        from dask.distributed import Client, LocalCluster

        client = Client(LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True))
    try:
        futures = [
            client.submit(predict_slide, str(s), str(o), model=model, mpp=mpp, overwrite=exists, pure=False, **kwargs)
            for s, o, exists in todo
        ]
        return list(client.gather(futures))
    finally:
        if own:
            cluster = client.cluster
            client.close()
            cluster.close()


def _workers(text: str) -> int | str:
    return text if text == "auto" else int(text)


def add_predict_parser(sub: Any) -> None:
    """Register ``squall predict`` on the sub-parsers ``sub``."""
    p = sub.add_parser("predict", help="predict expression from H&E for a slide or a folder of slides")
    p.add_argument("slides", help="a SpatialData .zarr, an H&E image, or a folder of them")
    p.add_argument("--model", required=True, help="model name (squall.models.list_models) or path")
    p.add_argument("--out", required=True, help="output folder: one <slide>.zarr per slide")
    p.add_argument("--scheduler", choices=["sync", "local"], default="sync", help="sync or a local dask cluster")
    p.add_argument("--n-workers", type=int, default=2, help="workers of --scheduler local (default: %(default)s)")
    p.add_argument("--mpp", type=float, default=None, help="µm/px of image files that record none")
    p.add_argument("--spots", choices=["visium", "bins", "tiles"], default=None, help="virtual spots (H&E only)")
    p.add_argument("--spot-size-um", type=float, default=None, help="virtual spot diameter / edge in µm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=_workers, default="auto",
                   help="DataLoader workers per slide (default: auto, 0 on CPU; 0 under --scheduler local)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dense-genes", nargs="*", default=None, help="genes to write as dense maps")
    p.add_argument("--overwrite", action="store_true", help="recompute slides whose output is complete")
    p.set_defaults(func=_predict_cmd)


def _predict_cmd(args: argparse.Namespace) -> int:
    done = run_predict(
        args.slides, args.out, model=args.model, scheduler=args.scheduler, n_workers=args.n_workers, mpp=args.mpp,
        overwrite=args.overwrite, spots=args.spots, spot_size_um=args.spot_size_um, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, dense_genes=args.dense_genes,
    )
    logger.info("predict: wrote %d store(s)", len(done))
    return 0


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    """Run ``squall predict`` alone."""
    parser = argparse.ArgumentParser(prog="squall")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
