"""Throughput and memory of ``squall.tl.predict_expression`` on real H&E.

Two workloads, each on H&E-only slides built by tiling the her2st C2 H&E (2 µm/px) to 1x, 4x and
16x the area (written to a temporary zarr first, so reading is lazy), with virtual Visium spots
over the detected tissue:

- ``bundled``: the model users get, ``squall.models.load("squall-tiny-her2st")`` (848 genes) at its
  native 2.0 µm/px: many tiles per slide (the realistic workload).
- ``worst``: squall-tiny with random weights at ``--mpp`` (default 8 µm/px, 256 genes): few, cheap
  tiles per slide, so the fixed per-slide work (tissue detection, laying the spots, building the
  table) weighs most. The worst case for the ratio below.
- ``large``: ``squall-555m`` (the published architecture) with random weights at 2.0 µm/px and 848
  genes: the GPU workload (``--device cuda``), where reading tiles must keep up with a fast forward.

For each:

1. Model-forward-only tiles/s vs end-to-end ``predict_expression`` tiles/s on the same tiles of the
   largest slide. Forward only is ``model.predict`` on the very batches ``predict_expression`` feeds
   it (the same tiles and the same sparse region weights, all read into memory before timing); end
   to end adds tissue detection, laying the spots, lazy reading, region weights and building the
   table. The ratio should be >= 0.8 on CPU.
2. Peak RSS of ``predict_expression`` per slide size, each in its own subprocess (``VmHWM``, the
   process's own high-water mark), beside the size of the output (table ``X``, ``obsm`` and the spot
   geometry), so a reader can see whether the growth with slide area is only the output.

Run::

    python benchmarks/predict_throughput.py [--sizes 1 4 16] [--threads 1] [--repeat 3]

``--device cuda`` runs the model on the GPU (bf16 autocast, the ``predict_expression`` default
there); one warm-up batch runs before timing in both the end-to-end and the forward-only process, so
CUDA/cuBLAS start-up is not counted in either. ``--threads`` sets ``torch.set_num_threads`` in every
process (default: torch's default); on a shared machine ``--threads 1`` gives the steadiest numbers.
``--repeat`` runs the throughput comparison (end to end and forward only alternate on the largest
slide, each in a fresh process) several times and keeps the best of each. ``--workloads`` picks
``bundled``, ``worst`` and / or ``large``.

It prints a table and writes ``benchmarks/results/predict_throughput.md`` and
``docs/benchmarks/predict_throughput.md`` (``predict_throughput_cuda.md`` with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = "squall-tiny-her2st"


def build_slide(factor: int, path: Path) -> tuple[int, int]:
    """Tile the bundled her2st C2 H&E (2 µm/px) ``sqrt(factor)`` x ``sqrt(factor)`` times into a zarr store."""
    import dask.array as da
    import numpy as np
    from PIL import Image

    from squall_sd._sdata import microns_scale
    from squall_sd.datasets._datasets import _bundle_dir
    from squall_sd.io._common import image_element, make_sdata, set_attrs

    with Image.open(_bundle_dir() / "he.jpg") as im:
        base = np.moveaxis(np.asarray(im.convert("RGB")), -1, 0)
    k = int(round(factor**0.5))
    arr = da.tile(da.from_array(base, chunks=(3, 1024, 1024)), (1, k, k))
    sdata = make_sdata(image=image_element(arr, {"microns": microns_scale(2.0)}))
    set_attrs(sdata, mpp=2.0, technology="he")
    sdata.write(path)
    return int(arr.shape[1]), int(arr.shape[2])


def make_model(workload: str, mpp: float):
    """The model of a workload and the µm/px it runs at."""
    import torch

    import squall_sd as squall

    if workload == "bundled":
        model = squall.models.load(BUNDLED)
        return model, float(model.config.mpp)
    torch.manual_seed(0)
    if workload == "large":
        return squall.models.create("squall-555m", genes=[f"GENE{i}" for i in range(848)], mpp=2.0), 2.0
    return squall.models.create("squall-tiny", genes=[f"GENE{i}" for i in range(256)], mpp=mpp), float(mpp)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` of a child process also counts the memory of the parent at the time it was
    spawned (Linux keeps the high-water mark across ``fork`` + ``exec``), so a parent that has just
    built a large slide inflates it; ``VmHWM`` belongs to the child's own address space.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs``), so that building the
    model (``squall-555m`` is initialised in fp32 on the CPU before moving to the GPU) does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def on_device(model, args: argparse.Namespace):
    """Move ``model`` to ``--device`` and, on CUDA, run one warm-up batch (CUDA / cuBLAS start-up)."""
    import torch

    model.to(args.device).eval()
    if args.device != "cpu":
        cfg = model.config
        rgb = torch.zeros(2, 3, cfg.img_size, cfg.img_size, dtype=torch.uint8)
        model.predict(rgb, float(cfg.mpp or 1.0), aggregate="tile")
        torch.cuda.synchronize()
    return model


def output_bytes(sdata) -> int:
    """Bytes of what ``predict_expression`` adds: table ``X`` + ``obsm``, the spots' columns and centres."""
    import numpy as np

    table = sdata.tables["squall_expression"]
    spots = sdata.shapes["squall_spots"]
    n = int(table.X.nbytes) + sum(int(np.asarray(v).nbytes) for v in table.obsm.values())
    n += sum(int(spots[c].to_numpy().nbytes) for c in spots.columns if c != "geometry")
    return n + 16 * len(spots)  # point coordinates (x, y float64)


def predict_slide(sdata, model, mpp: float, args: argparse.Namespace) -> float:
    """Seconds of one ``tl.predict_expression`` call on ``sdata``, with the options the benchmark measures."""
    import squall_sd as squall

    t0 = time.perf_counter()
    squall.tl.predict_expression(sdata, model, spots="visium", mpp=mpp, progress=False, batch_size=args.batch_size,
                                 num_workers=args.num_workers, write_to_store=False, device=args.device)
    return time.perf_counter() - t0


def child(zarr: str, args: argparse.Namespace) -> None:
    """Run predict_expression on one slide and print a JSON line (tiles, seconds, peak RSS)."""
    import spatialdata as sd
    import torch

    import squall_sd as squall
    import squall_sd.pp  # noqa: F401 - imports outside the timed region (as forward_only does)
    import squall_sd.tl  # noqa: F401

    set_threads(args.threads)
    model, mpp = make_model(args.workload, args.mpp)
    model = on_device(model, args)
    sdata = sd.read_zarr(zarr)
    made = []  # the PatchDataset predict_expression reads from (to count its chunk decodes)
    extract = squall.pp.extract_patches

    def counting(*a, **k):
        made.append(extract(*a, **k))
        return made[-1]

    squall.pp.extract_patches = counting
    reset_peak_rss()
    rss0 = peak_rss_mb()
    dt = predict_slide(sdata, model, mpp, args)
    rss1 = peak_rss_mb()
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device != "cpu" else None
    ds = made[0]
    cache = ds._chunks
    chunks = 0 if cache is None else (len(cache.ybounds) - 1) * (len(cache.xbounds) - 1)
    params = sdata.tables["squall_expression"].uns["squall"]["predict_expression"]["params"]
    h, w = sdata.images["he"]["scale0"]["image"].shape[1:]
    print(json.dumps({
        "tiles": params["n_tiles"], "spots": sdata.tables["squall_expression"].n_obs, "seconds": dt,
        "maxrss_mb": rss1, "shape": [int(h), int(w)], "rss_before_mb": rss0,
        "genes": sdata.tables["squall_expression"].n_vars, "output_mb": output_bytes(sdata) / 2**20,
        "decodes": ds.decodes, "level_chunks": chunks, "level": ds.level.name, "cache_mb": ds.cache_mb,
        "gpu_peak_mb": gpu_mb,
    }))


def forward_only(zarr: str, args: argparse.Namespace) -> dict:
    """Seconds of ``model.predict`` alone on the batches ``predict_expression`` feeds it (pre-read into memory)."""
    import torch

    set_threads(args.threads)
    model, mpp = make_model(args.workload, args.mpp)
    model = on_device(model, args)
    batches = forward_batches(model, mpp, zarr, args)
    dt = time_forward(model, mpp, batches)
    n = sum(len(b[0]) for b in batches)
    assert isinstance(batches[0][1], torch.Tensor)
    return {"tiles": n, "seconds": dt, "tiles_per_s": n / dt}


def forward_batches(model, mpp: float, zarr: str, args: argparse.Namespace) -> list:
    """The batches ``predict_expression`` feeds the model on the slide ``zarr``, read into memory."""
    from functools import partial

    import spatialdata as sd

    import squall_sd as squall
    from squall_sd.tl._engine import TileDataset, centers_and_extent, collate_tiles, plan_tiles
    from squall_sd.tl._inference import virtual_spots

    sdata = sd.read_zarr(zarr)
    spots, _ = virtual_spots(sdata, image_key="he", spots="visium", spot_size_um=None)
    c, h = centers_and_extent(spots)
    cfg = model.config
    plan = plan_tiles(c, h, tile_um=cfg.img_size * mpp, token_um=cfg.patch_size * mpp)
    patches = squall.pp.extract_patches(sdata, plan.centers, patch_px=cfg.img_size, mpp=mpp)
    ds = TileDataset(patches, spots, plan, patch_px=cfg.img_size, mpp=mpp, grid=cfg.expr_size)
    collate = partial(collate_tiles, grid=cfg.expr_size, plan=plan, sparse=True)
    return [collate([ds[t] for t in range(i, min(i + args.batch_size, len(ds)))])
            for i in range(0, len(ds), args.batch_size)]


def time_forward(model, mpp: float, batches: list) -> float:
    """Seconds of ``model.predict`` over ``batches`` (each result copied to the host, so CUDA has finished)."""
    t0 = time.perf_counter()
    for _tids, rgb, w, _ridx in batches:
        model.predict(rgb, mpp, aggregate=w, reduce="sum").cpu().numpy()  # autocast: bf16 on CUDA only
    return time.perf_counter() - t0


def steady(zarr: str, args: argparse.Namespace) -> dict:
    """Per-slide cost in one warm process: after one warm-up of each, forward only and end to end alternate.

    The fresh-process runs count what a first call in a new session pays (page faults, oneDNN kernel
    set-up, first reads) on both sides; here each slide is a fresh ``read_zarr`` of the same store in a
    process that has predicted once already, which is what each further slide of a session costs, and
    each round's two passes run seconds apart, so a shared machine's drift touches both alike.
    """
    import spatialdata as sd

    import squall_sd.pp  # noqa: F401 - imports outside the timed region
    import squall_sd.tl  # noqa: F401

    set_threads(args.threads)
    model, mpp = make_model(args.workload, args.mpp)
    model = on_device(model, args)
    batches = forward_batches(model, mpp, zarr, args)

    def end_to_end() -> float:
        return predict_slide(sd.read_zarr(zarr), model, mpp, args)

    end_to_end(), time_forward(model, mpp, batches)  # warm-up, not counted
    fwd, e2e = [], []
    for _ in range(max(1, args.steady)):
        fwd.append(time_forward(model, mpp, batches))
        e2e.append(end_to_end())
    return {"fwd": fwd, "e2e": e2e, "tiles": sum(len(b[0]) for b in batches)}


def run_child(flag: str, path: Path, args: argparse.Namespace, workload: str) -> dict:
    """Run this script with ``flag`` (``--child``, ``--forward``, ``--steady-child``) on ``path``, fresh process."""
    cmd = [sys.executable, __file__, flag, str(path), "--workload", workload, "--mpp", str(args.mpp),
           "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
           "--device", args.device, "--steady", str(args.steady)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SQUALL_LOGLEVEL": "WARNING"})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def workers(args: argparse.Namespace) -> int:
    """The DataLoader workers ``--num-workers`` means on ``--device``."""
    import torch

    from squall_sd.tl._engine import resolve_workers

    return resolve_workers(args.num_workers, torch.device(args.device))


def describe(workload: str, args: argparse.Namespace) -> str:
    if workload == "bundled":
        from squall_sd.models import load

        c = load(BUNDLED).config
        return f"`{BUNDLED}` (bundled weights, {c.n_genes} genes, {c.img_size} px tiles at its native {c.mpp:g} µm/px)"
    if workload == "large":
        return "squall-555m (random weights, 848 genes, 224 px tiles at 2.0 µm/px)"
    return f"squall-tiny (random weights, 256 genes, 224 px tiles at {args.mpp:g} µm/px)"


def bench(workload: str, slides: dict[int, Path], args: argparse.Namespace) -> dict:
    rows = []
    for f, path in slides.items():
        rec = run_child("--child", path, args, workload)
        rec["factor"] = f
        rows.append(rec)
        print(f"[{workload}] {f:>3}x  {rec['shape']}  {rec['tiles']} tiles  {rec['spots']} spots  "
              f"{rec['seconds']:.1f} s  peak RSS {rec['maxrss_mb']:.0f} MB (before {rec['rss_before_mb']:.0f}), "
              f"output {rec['output_mb']:.1f} MB, {rec['decodes']} decodes of {rec['level_chunks']} chunks",
              flush=True)
    last = slides[max(slides)]
    e2e = [rows[-1]["seconds"]]
    fwds = []
    for k in range(max(1, args.repeat)):
        if k > 0:
            e2e.append(run_child("--child", last, args, workload)["seconds"])
        fwds.append(run_child("--forward", last, args, workload))
        print(f"[{workload}] run {k + 1}: end to end {e2e[-1]:.2f} s, forward only {fwds[-1]['seconds']:.2f} s",
              flush=True)
    out = {"rows": rows, "e2e": e2e, "fwd": [r["seconds"] for r in fwds], "tiles": fwds[0]["tiles"]}
    if args.steady:
        out["steady"] = run_child("--steady-child", last, args, workload)
        print(f"[{workload}] one process: forward only {out['steady']['fwd']}, end to end {out['steady']['e2e']}",
              flush=True)
    return out


def results_cache_mb(results: dict[str, dict]) -> str:
    """The chunk cache size(s) the runs used, e.g. ``"24 MB"``."""
    sizes = sorted({r["cache_mb"] for res in results.values() for r in res["rows"]})
    return ", ".join(f"{s:g} MB" for s in sizes)


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    import torch

    cmd = "python benchmarks/predict_throughput.py " + " ".join(sys.argv[1:])
    big = max(args.sizes)
    if args.device == "cpu":
        where = "CPU, fp32"
    else:
        where = f"{torch.cuda.get_device_name(args.device)}, bf16 autocast, one warm-up batch before timing"
    lines = [
        "# predict_expression throughput and memory" + ("" if args.device == "cpu" else " on a GPU"),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s) (shared), "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} torch thread(s), {where}"
        + (f"; best of {args.repeat} alternating runs." if args.repeat > 1 else ".") + "  ",
        "Slides: H&E only, built by tiling the her2st C2 H&E (2 µm/px) and written to zarr (1024 px chunks, "
        "5 levels); virtual Visium spots (55 µm) over the detected tissue; "
        f"batch {args.batch_size}, `num_workers={args.num_workers!r}` ({workers(args)} DataLoader workers"
        + ("; tiles read in a prefetch thread)." if workers(args) == 0 else ")."),
        "",
        f"## Throughput ({big}x slide, same tiles)",
        "",
        "Forward only: `model.predict` on the batches `predict_expression` feeds it (same tiles, same sparse "
        "region weights), all read into memory before timing. End to end: `tl.predict_expression` "
        "(tissue detection, virtual spots, lazy reading, region weights, forward, table).",
        "",
        "| workload | model | tiles | forward only (s) | forward tiles/s | end to end (s) | end-to-end tiles/s "
        "| **ratio** (target >= 0.8 on CPU) | ratio, median of the runs' own |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for wl, res in results.items():
        fwd, e2e, n = min(res["fwd"]), min(res["e2e"]), res["tiles"]
        label = {"bundled": "bundled model (primary)", "worst": "worst case", "large": "published size"}[wl]
        # each run's forward-only pass follows its end-to-end pass: their ratio is less exposed to a shared
        # machine's drift than the ratio of the two bests
        paired = statistics.median(f / e for f, e in zip(res["fwd"], res["e2e"], strict=False))
        lines.append(f"| {label} | {describe(wl, args)} | {n} | {fwd:.2f} | {n / fwd:.1f} | {e2e:.2f} | "
                     f"{n / e2e:.1f} | **{fwd / e2e:.2f}** | {paired:.2f} |")
    if any("steady" in res for res in results.values()):
        lines += [
            "",
            f"**Per further slide, one warm process** (`--steady {args.steady}`): after one end-to-end call and one "
            "forward pass as warm-up, forward only and end to end alternate on a fresh `read_zarr` of the same "
            "slide; medians, and the median of each round's ratio. The fresh-process table above also counts what "
            "the first call of a session pays (page faults, kernel set-up, first reads), on both sides.",
            "",
            "| workload | tiles | forward only (s, median) | end to end (s, median) | ratio of medians "
            "| ratio, median of the rounds' own |",
            "|---|---|---|---|---|---|",
        ]
        for wl, res in results.items():
            st = res.get("steady")
            if st is None:
                continue
            f_med, e_med = statistics.median(st["fwd"]), statistics.median(st["e2e"])
            own = statistics.median(f / e for f, e in zip(st["fwd"], st["e2e"], strict=True))
            lines.append(f"| {wl} | {st['tiles']} | {f_med:.2f} | {e_med:.2f} | {f_med / e_med:.2f} | {own:.2f} |")
    runs = []
    for wl, res in results.items():
        e2e = ", ".join(f"{s:.2f}" for s in res["e2e"])
        fwd = ", ".join(f"{s:.2f}" for s in res["fwd"])
        runs.append(f"{wl}: end to end {e2e}, forward {fwd}")
        if "steady" in res:
            st = res["steady"]
            runs.append(f"{wl}, one process: end to end {', '.join(f'{s:.2f}' for s in st['e2e'])}, "
                        f"forward {', '.join(f'{s:.2f}' for s in st['fwd'])}")
    lines += ["", "All runs (seconds, in order): " + "; ".join(runs) + ".", ""]
    lines += [
        "## Peak memory vs slide size (one subprocess per size, peak RSS = `VmHWM`)",
        "",
        "Growth = peak RSS during `predict_expression` minus RSS before it (after imports, model and "
        "`read_zarr`; the high-water mark is reset just before the call). Output = what it adds to the "
        "SpatialData: table `X` (spots x genes x 4 bytes), "
        "`obsm['spatial']` and the spots' centres and columns. Growth - output is what reading, the model and "
        "the per-slide work hold beyond the result; flat memory means it does not grow with the area. Decodes: "
        "image chunks decoded (1024 x 1024 x 3 bytes each) into `PatchDataset`'s chunk cache "
        f"(`cache_mb` = {results_cache_mb(results)}) / chunks of the level read.",
        "",
        "| workload | area | image (px) | tiles | spots | seconds | tiles/s | RSS before (MB) | peak RSS (MB) "
        "| growth (MB) | output (MB) | growth - output (MB) | decodes / level chunks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for wl, res in results.items():
        for r in res["rows"]:
            lines.append(
                f"| {wl} | {r['factor']}x | {r['shape'][0]} x {r['shape'][1]} | {r['tiles']} | {r['spots']} | "
                f"{r['seconds']:.1f} | {r['tiles'] / r['seconds']:.1f} | {r['rss_before_mb']:.0f} | "
                f"{r['maxrss_mb']:.0f} | {r['maxrss_mb'] - r['rss_before_mb']:.0f} | {r['output_mb']:.1f} | "
                f"{r['maxrss_mb'] - r['rss_before_mb'] - r['output_mb']:.0f} | "
                f"{r['decodes']} / {r['level_chunks']} ({r['level']}) |"
            )
    if args.device != "cpu":
        gpu = ", ".join(
            f"{wl} {r['factor']}x {r['gpu_peak_mb']:.0f}" for wl, res in results.items() for r in res["rows"]
        )
        lines += ["", f"Peak GPU memory allocated by torch (MB, model weights included): {gpu}."]
    if workers(args):
        lines += ["", f"With {workers(args)} DataLoader workers, peak RSS and decodes are the main process's "
                  "only: each worker reads its own tiles and keeps its own chunk cache (at most `cache_mb`)."]
    lines += ["", "Peak RSS is the child's own high-water mark (`VmHWM`); `ru_maxrss` would include the parent's "
              "memory at spawn time (the slide it has just built)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mpp", type=float, default=8.0, help="µm/px of the worst-case workload (tile = 224 px x mpp)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=lambda t: t if t == "auto" else int(t), default="auto",
                    help="DataLoader workers (default: auto, as predict_expression: 0 on CPU, "
                    "min(8, cores // 2) on GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--repeat", type=int, default=1, help="throughput runs on the largest slide (best is kept)")
    ap.add_argument("--steady", type=int, default=0,
                    help="also time N alternating rounds in one warm process (per-slide cost after the first call)")
    ap.add_argument("--workloads", nargs="+", default=["bundled", "worst"], choices=["bundled", "worst", "large"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on CUDA)")
    ap.add_argument("--out", default=None, help="also write the report here (default: only the two md files)")
    ap.add_argument("--no-write", action="store_true", help="print the report only")
    ap.add_argument("--workload", default="worst", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--forward", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--steady-child", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steady_child:
        print(json.dumps(steady(args.steady_child[0], args)))
        return
    if args.child:
        child(args.child[0], args)
        return
    if args.forward:
        print(json.dumps(forward_only(args.forward[0], args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        slides = {}
        for f in sorted(args.sizes):
            slides[f] = Path(tmp) / f"slide_{f}x.zarr"
            build_slide(f, slides[f])
        results = {wl: bench(wl, slides, args) for wl in args.workloads}
    text = report(results, args)
    print(text)
    if args.no_write:
        return
    name = "predict_throughput.md" if args.device == "cpu" else "predict_throughput_cuda.md"
    targets = [ROOT / "benchmarks" / "results" / name, ROOT / "docs" / "benchmarks" / name]
    if args.out:
        targets.append(Path(args.out))
    for p in targets:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


if __name__ == "__main__":
    main()
