"""Throughput of the SQUALL model family: tiles/s, GFLOP per tile and achieved TFLOP/s.

For every registered configuration and batch size it times

- ``embed``: H&E → tokens (``forward_rgb``),
- ``expr-dense``: H&E → dense expression grid, all genes (B, 56, 56, G),
- ``expr-dense-50g``: dense grid for a 50-gene subset (only those ``fc2`` rows are evaluated),
- ``expr-tile``: one vector per tile, all genes, aggregated inside the forward (no dense grid),
- ``expr-tile-50g``: the same for a 50-gene subset,

counts FLOPs per tile with :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device,
and compares the achieved TFLOP/s with a measured matmul peak of the same device and dtype.

Examples
--------
CPU (2 cores, fp32)::

    python benchmarks/model_throughput.py --device cpu --dtype fp32 --batch-sizes 1,4

GPU::

    python benchmarks/model_throughput.py --device cuda --dtype bf16 --batch-sizes 1,8,32,128
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import squall_sd
import squall_sd.models as sm

MODES = ("embed", "expr-dense", "expr-dense-50g", "expr-tile", "expr-tile-50g")
N_SUBSET = 50


def _run(model: sm.Squall, mode: str, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    genes = list(range(N_SUBSET)) if mode.endswith("-50g") else None
    if mode == "embed":
        return model.embed(x, 0.5, pool=None, autocast=autocast)
    aggregate = "tile" if mode.startswith("expr-tile") else None
    return model.predict(x, 0.5, genes=genes, aggregate=aggregate, autocast=autocast)


def gflop_per_tile(name: str, mode: str) -> float:
    """FLOPs of one tile (batch 1) counted on the meta device, in GFLOP."""
    with torch.device("meta"):
        model = sm.create(name).eval()
    x = torch.empty(1, 3, 224, 224, device="meta")
    with FlopCounterMode(display=False) as fc:
        _run(model, mode, x, autocast=False)
    return fc.get_total_flops() / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """Measured TFLOP/s of a square matmul of size ``n`` in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type == "cuda" and iters % 10:
            continue
        _sync(device)
    _sync(device)
    dt = time.perf_counter() - t0
    return 2 * n**3 * iters / dt / 1e12


def time_mode(
    model: sm.Squall,
    mode: str,
    batch: int,
    device: torch.device,
    autocast: bool,
    seconds: float,
    max_iters: int,
) -> float:
    """Tiles per second (uint8 tiles already on the device, as a data loader would deliver them)."""
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    _run(model, mode, x, autocast)  # warm-up
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while True:
        out = _run(model, mode, x, autocast)
        del out
        iters += 1
        _sync(device)
        if time.perf_counter() - t0 >= seconds or iters >= max_iters:
            break
    return batch * iters / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    p.add_argument(
        "--weights-bf16",
        action="store_true",
        help="cast the weights to bf16 (no autocast) instead of fp32 + autocast",
    )
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--configs", default="squall-tiny,squall-small,squall-base,squall-555m")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument(
        "--max-batch-555m",
        type=int,
        default=None,
        help="cap the batch of squall-555m (default: 1 on CPU)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="time budget per measurement (CPU 3 s, GPU 1.5 s)",
    )
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the H&E → expression path")
    p.add_argument(
        "--out", default=None, help="default: benchmarks/results/model_throughput_<device>.md"
    )
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 1
    torch_dtype = torch.bfloat16 if (args.dtype == "bf16" or args.weights_bf16) else torch.float32
    autocast = args.dtype == "bf16" and not args.weights_bf16
    batches = [int(b) for b in args.batch_sizes.split(",")]
    configs = args.configs.split(",")
    modes = args.modes.split(",")
    seconds = args.seconds or (3.0 if device.type == "cpu" else 1.5)
    cap_555m = args.max_batch_555m or (1 if device.type == "cpu" else max(batches))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )

    peak_name = "bf16" if torch_dtype == torch.bfloat16 else "fp32"
    peak_n = 8192 if device.type == "cuda" else 2048
    peak = matmul_peak(device, torch_dtype, peak_n)
    variant = (
        "bf16 weights" if args.weights_bf16 else f"{args.dtype}" + (" autocast" if autocast else "")
    )
    variant += " + torch.compile" if args.compile else ""
    print(
        f"device: {dev_name}; {variant}; measured {peak_name} matmul peak ({peak_n}²): {peak:.2f} "
        "TFLOP/s"
    )

    rows = []
    header = (
        "| model | params (M) | mode | batch | GFLOP/tile | tiles/s | ms/tile | TFLOP/s "
        "| % of matmul peak |"
    )
    print(header)
    for name in configs:
        flops = {m: gflop_per_tile(name, m) for m in modes}
        torch.manual_seed(0)
        with torch.device(device):
            model = sm.create(name, drop_path_rate=0.0).eval()
        if args.weights_bf16:
            model = model.to(torch.bfloat16)
        if args.compile:
            model.compile_inference()
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        for batch in batches:
            if name == "squall-555m" and batch > cap_555m:
                continue
            for mode in modes:
                try:
                    tps = time_mode(model, mode, batch, device, autocast, seconds, args.max_iters)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = f"| {name} | {n_params:.1f} | {mode} | {batch} | {flops[mode]:.2f} "
                    row += "| OOM | | | |"
                    rows.append(row)
                    print(row, flush=True)
                    continue
                tflops = flops[mode] * tps / 1e3
                row = (
                    f"| {name} | {n_params:.1f} | {mode} | {batch} | {flops[mode]:.2f} | "
                    f"{tps:.2f} | "
                    f"{1e3 / tps:.1f} | {tflops:.3f} | {100 * tflops / peak:.0f} % |"
                )
                rows.append(row)
                print(row, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / f"model_throughput_{device.type}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/model_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = [
        f"# Model throughput ({device.type}, {variant})",
        "",
        f"- command: `{cmd}`",
        f"- device: {dev_name}; torch {torch.__version__}; squall-sd {squall_sd.__version__}",
        f"- measured {peak_name} matmul peak ({peak_n}×{peak_n}): **{peak:.2f} TFLOP/s**",
        "- tiles: 224×224 uint8 RGB already on the device, res 0.5 µm/px, random weights;",
        "  GFLOP/tile counted with `torch.utils.flop_counter.FlopCounterMode` (batch 1, meta "
        "device).",
        f"- modes: {', '.join(modes)} (`-50g` = {N_SUBSET}-gene subset; `expr-tile` aggregates "
        "inside the forward)",
        "",
        header,
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    out.write_text("\n".join(text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
