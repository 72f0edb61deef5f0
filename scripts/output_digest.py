"""Digest every output of ``predict_expression``, ``embed`` and ``prepare``, to check a refactor is bit-identical.

Run it before and after a structural change and compare the two JSON files::

    python scripts/output_digest.py --out before.json            # on the old commit
    python scripts/output_digest.py --out after.json             # on the new one
    python scripts/output_digest.py --compare before.json after.json

Each case runs on the bundled example and, when ``--her2st`` points at a her2st folder, on one
her2st section. The digest of an AnnData covers ``X``, every layer, ``obs``, ``var``, ``obsm`` and
``uns`` (minus the timestamp and version fields of provenance); of a shapes element its geometry;
of an image its pixels; of a prepared folder the bytes of every file (manifest minus its
timestamp).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

VOLATILE = {"created", "date", "time", "timestamp", "version", "squall_sd_version", "elapsed_s", "duration_s"}


def _h(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _arr(a: Any) -> str:
    from scipy import sparse

    if sparse.issparse(a):
        a = a.tocsr()
        return _h(np.asarray(a.data).tobytes() + np.asarray(a.indices).tobytes() + np.asarray(a.indptr).tobytes())
    a = np.asarray(a)
    if a.dtype == object:
        return _h(repr(a.tolist()).encode())
    return _h(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode())


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])) if str(k) not in VOLATILE}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _arr(obj)
    if hasattr(obj, "to_numpy"):  # pandas
        return _frame(obj)
    if isinstance(obj, (np.floating, float)):
        return repr(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj if isinstance(obj, (str, int, bool, type(None))) else repr(obj)


def _frame(df: Any) -> dict[str, str]:
    import pandas as pd

    if isinstance(df, pd.Series):
        df = df.to_frame()
    out = {"index": _h(repr(list(df.index)).encode())}
    for c in df.columns:
        col = df[c]
        out[str(c)] = (
            _h(repr(col.astype(str).tolist()).encode())
            if col.dtype == object or str(col.dtype) == "category"
            else _arr(col.to_numpy())
        )
    return out


def digest_adata(adata: Any) -> dict[str, Any]:
    """Digest X, layers, obs, var, obsm and uns of an AnnData."""
    return {
        "shape": list(adata.shape),
        "X": None if adata.X is None else _arr(adata.X),
        "layers": {k: _arr(v) for k, v in adata.layers.items()},
        "obs": _frame(adata.obs),
        "var": _frame(adata.var),
        "obsm": {k: _arr(v) for k, v in adata.obsm.items()},
        "uns": _plain(dict(adata.uns)),
    }


def digest_sdata(sdata: Any, keys: list[str]) -> dict[str, Any]:
    """Digest the named tables, shapes and images of a SpatialData."""
    out: dict[str, Any] = {}
    for k in keys:
        if k in sdata.tables:
            out[k] = digest_adata(sdata.tables[k])
        elif k in sdata.shapes:
            g = sdata.shapes[k]
            out[k] = {
                "geometry": _h(
                    g.geometry.to_wkb().tobytes()
                    if hasattr(g.geometry.to_wkb(), "tobytes")
                    else repr(list(g.geometry.to_wkb())).encode()
                ),
                "index": _h(repr(list(g.index)).encode()),
                "cols": _frame(g.drop(columns="geometry")),
            }
        elif k in sdata.images:
            el = sdata.images[k]
            arr = el["scale0"]["image"] if hasattr(el, "children") and "scale0" in el else el
            out[k] = {"pixels": _arr(np.asarray(arr.values)), "dims": list(arr.dims)}
        else:
            out[k] = "missing"
    return out


def digest_dir(root: Path) -> dict[str, str]:
    """Digest every file under a folder."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            if p.suffix == ".json":
                try:
                    out[rel] = _h(json.dumps(_plain(json.loads(p.read_text())), sort_keys=True).encode())
                    continue
                except ValueError:
                    pass
            out[rel] = _h(p.read_bytes())
    return out


def _new_keys(before: set[str], sdata: Any) -> list[str]:
    now = set(sdata.tables) | set(sdata.shapes) | set(sdata.images)
    return sorted(now - before | {"table"} & now)


def run_cases(name: str, make: Any, tmp: Path, *, model: str, only: str = "") -> dict[str, Any]:
    """Run every case on the data ``make()`` returns and digest its outputs."""
    import squall_sd as sq

    out: dict[str, Any] = {}

    def keys(sd: Any) -> set[str]:
        return set(sd.tables) | set(sd.shapes) | set(sd.images)

    cases = {
        "predict_default": lambda sd: sq.tl.predict_expression(sd, model, progress=False, num_workers=0),
        "predict_shapes": lambda sd: sq.tl.predict_expression(
            sd, model, layout="shapes", progress=False, num_workers=0
        ),
        "predict_tiles_dense": lambda sd: sq.tl.predict_expression(
            sd, model, layout="tiles", dense_genes=["ERBB2"], progress=False, num_workers=0
        ),
        "predict_virtual_spots": lambda sd: sq.tl.predict_expression(
            sd, model, spots="tiles", spot_size_um=100.0, progress=False, num_workers=0
        ),
        "predict_copy": lambda sd: sq.tl.predict_expression(sd, model, inplace=False, progress=False, num_workers=0),
        "embed_region": lambda sd: sq.tl.embed(sd, model, progress=False, num_workers=0),
        "embed_tile": lambda sd: sq.tl.embed(sd, model, pool="tile", progress=False, num_workers=0),
        "embed_token_map": lambda sd: sq.tl.embed(
            sd, model, token_map=True, token_stride=2, progress=False, num_workers=0
        ),
    }
    for case, fn in cases.items():
        if only not in case:
            continue
        sd = make()
        before = keys(sd)
        try:
            res = fn(sd)
        except Exception as e:  # noqa: BLE001 - a failure is part of the behaviour
            out[case] = f"raised {type(e).__name__}: {e}"
            continue
        d = digest_sdata(sd, sorted((keys(sd) - before) | ({"table"} & keys(sd))))
        if res is not None:
            d["returned"] = digest_adata(res)
        out[case] = d
        print(f"{name}/{case}: done", file=sys.stderr)
    for case, kw in {
        "prepare_grid": {},
        "prepare_spots": {"tile_centers": "spots", "tiles_per_spot": 2, "jitter_um": 20.0, "seed": 3},
        "prepare_dense": {"expr_format": "dense"},
    }.items():
        if only not in case:
            continue
        target = tmp / f"{name}-{case}"
        try:
            sq.train.prepare([make()], target, model_config_or_name="squall-tiny", **kw)
        except Exception as e:  # noqa: BLE001
            out[case] = f"raised {type(e).__name__}: {e}"
            continue
        out[case] = digest_dir(target)
        print(f"{name}/{case}: done", file=sys.stderr)
    return out


def compare(a: Any, b: Any, path: str = "") -> list[str]:
    """List the paths where two digests differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                diffs.append(f"{path}/{k}: only in {'after' if k in b else 'before'}")
            else:
                diffs += compare(a[k], b[k], f"{path}/{k}")
        return diffs
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main() -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--her2st", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/her2st")
    p.add_argument("--section", default="C2")
    p.add_argument("--only", default="", help="run only the cases whose name contains this (predict, embed, prepare)")
    p.add_argument("--skip-her2st", action="store_true", help="only the bundled example")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        before, after = (json.loads(f.read_text()) for f in args.compare)
        # compare only the cases both files ran (a run with --only / --skip-her2st covers fewer)
        before = {s: {c: v for c, v in cs.items() if c in after.get(s, {})} for s, cs in before.items() if s in after}
        diffs = compare(before, after)
        print("\n".join(diffs) if diffs else "identical")
        sys.exit(1 if diffs else 0)

    import torch

    torch.set_num_threads(1)
    import squall_sd as sq

    model = "squall-tiny-her2st"
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        result["example"] = run_cases("example", sq.datasets.example, Path(tmp), model=model, only=args.only)
        if args.her2st.exists() and not args.skip_her2st:
            result[args.section] = run_cases(
                args.section,
                lambda: sq.datasets.her2st(args.section, args.her2st),
                Path(tmp),
                model=model,
                only=args.only,
            )
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
