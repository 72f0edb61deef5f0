"""Niche benchmark (docs/benchmarks/niches.md; design: evaluation.md §2).

1. her2st A1, C1, D1 (measured counts, HER2+ breast cancer, legacy ST): ARI and NMI of niche labels
   against the pathologist's regions (joined on ROUNDED array coordinates by
   ``squall.datasets.her2st``; "undetermined" and unlabelled spots excluded from the scores, every
   spot used for clustering). All methods get the same input: per section CP10k + log1p, then PCA.
   Nothing is chosen with the labels: tl.niches picks its number of niches by stability.
2. Scale: graph + niches on the 36,602-cell Xenium mouse brain fixture, wall time and peak memory.

    python benchmarks/niches.py                      # full run (~25-40 min on 2 shared cores, CellCharter dominates)
    python benchmarks/niches.py --quick              # 1 seed, no CellCharter, smaller Xenium candidate range
    python benchmarks/niches.py --skip-cellcharter --seeds 3
    python benchmarks/niches.py --dev                # development sections E1, F1, G2, H1 (authors' clusters)
    python benchmarks/niches.py --from-he MODEL_DIR  # A1 from its H&E alone (predicted expression, embeddings)
    python benchmarks/niches.py --from-he MODEL_DIR --dev  # the same on its validation sections (development)

``--from-he`` scores niches found from the H&E alone on the labelled sections that have one (A1):
expression predicted by a model that never saw the section's patient (e.g. one trained on patient C
only), that model's tile embeddings (``tl.embed``) and, as the image-only baseline, hand-made
colour/texture features of the same tiles (aggregated over the graph by the same methods), beside
the measured counts of the same spots, with every method. Written to results/niches_he.md.

CellCharter labels are cached in results/cache/niches_cellcharter_<sha256 of its 10 PCs, coordinates,
parameters, seed and version>.npz, so a rerun only repeats CellCharter when its input changed.

Rows (methods):
  squall gmm          squall.tl.niches defaults: radius graph (1.5 x median NN distance), 3 hops,
                      10 PCs, Gaussian mixture, n_niches in 2..10 chosen by stability (10 runs)
  squall leiden       squall.tl.niches(method="leiden"), resolution 1
  squall gmm joint    one tl.niches call on A1+C1+D1 together (library_key, joint PCA), scored per section,
                      without correction and with batch_key="section" (per-section alignment)
  scanpy leiden expr  sc.pp.neighbors on X_pca (scanpy defaults) + sc.tl.leiden(resolution=1): expression only
  squidpy+leiden space  squidpy radius graph (same as squall) + scanpy Leiden on that graph: space only
  CellCharter         cellcharter 0.3.7 (pip): squidpy Delaunay graph + cc.gr.remove_long_links,
                      cc.gr.aggregate_neighbors(n_layers=3) on the same 10 PCs,
                      cc.tl.ClusterAutoK(n_clusters=(2, 10), max_runs=5) -> best_k
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
SHARED = Path(os.environ.get("SQUALL_SHARED_DATA", ROOT.parent / "shared" / "data"))
XENIUM = SHARED / "fixtures/spatialexperiment_3f497ac/inst/extdata/10xXenium"
SECTIONS = ("A1", "C1", "D1")
DEV_SECTIONS = ("E1", "F1", "G2", "H1")  # development: patients E-H, the authors' expression clusters
CACHE = HERE / "results" / "cache"

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def _prep(adata, seed: int = 0):
    import scanpy as sc

    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50, random_state=seed)
    return adata


def load_section(sec: str):
    import squall_sd as squall

    a = squall.datasets.her2st(sec, SHARED / "her2st").tables["table"]
    a.obs_names = [f"{sec}_{n}" for n in a.obs_names]
    return a


REFERENCE = "pathologist_label"


def _scores(adata, labels) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    lab = adata.obs[REFERENCE].astype(object)
    m = (lab.notna() & (lab != "undetermined")).to_numpy()
    y, p = lab[m].astype(str).to_numpy(), np.asarray(labels).astype(str)[m]
    return {
        "n_scored": int(m.sum()),
        "ari": adjusted_rand_score(y, p),
        "nmi": normalized_mutual_info_score(y, p),
        "k": len(np.unique(labels)),
    }


# ---------------------------------------------------------------------------------------------- methods
def m_squall_gmm(a, seed):
    import squall_sd as squall

    squall.tl.niches(a, use_rep="X_pca", random_state=seed)
    return a.obs["squall_niche"].to_numpy()


def m_squall_leiden(a, seed):
    import squall_sd as squall

    squall.tl.niches(a, use_rep="X_pca", method="leiden", random_state=seed)
    return a.obs["squall_niche"].to_numpy()


def m_scanpy_leiden(a, seed):
    import scanpy as sc

    sc.pp.neighbors(a, use_rep="X_pca", random_state=seed)
    sc.tl.leiden(a, flavor="igraph", n_iterations=2, directed=False, random_state=seed, key_added="lx")
    return a.obs["lx"].to_numpy()


def m_squidpy_space_leiden(a, seed):
    import scanpy as sc
    import squidpy as sq

    from squall_sd.tl._utils import _auto_radius

    r = _auto_radius(np.asarray(a.obsm["spatial"]), None)
    sq.gr.spatial_neighbors_radius(a, radius=r)
    sc.tl.leiden(
        a,
        adjacency=a.obsp["spatial_connectivities"],
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=seed,
        key_added="ls",
    )
    return a.obs["ls"].to_numpy()


CC_PARAMS = {"graph": "delaunay+remove_long_links", "n_layers": 3, "n_pcs": 10, "n_clusters": [2, 10], "max_runs": 5}


def _cc_key(a, seed) -> str:
    """Hash of CellCharter's exact inputs (the 10 PCs, the coordinates) + parameters + version."""
    import hashlib

    import cellcharter

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(a.obsm["X_pca"][:, :10], dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(a.obsm["spatial"], dtype=np.float64).tobytes())
    h.update(json.dumps({**CC_PARAMS, "seed": seed, "version": cellcharter.__version__}).encode())
    return h.hexdigest()[:16]


def m_cellcharter(a, seed):
    """CellCharter, cached in results/cache/niches_cellcharter_<hash of inputs>.npz (labels + seconds)."""
    key = _cc_key(a, seed)
    path = CACHE / f"niches_cellcharter_{key}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        m_cellcharter.cached_time = float(z["time_s"])
        return z["labels"]
    t0 = time.perf_counter()
    labels = _run_cellcharter(a, seed)
    m_cellcharter.cached_time = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, labels=labels.astype(str), time_s=m_cellcharter.cached_time)
    os.replace(tmp, path)
    return labels


def _run_cellcharter(a, seed):
    import cellcharter as cc
    import squidpy as sq
    import torch

    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    a.obsm["X_pca10"] = np.ascontiguousarray(a.obsm["X_pca"][:, :10])
    sq.gr.spatial_neighbors_delaunay(a)
    cc.gr.remove_long_links(a)
    cc.gr.aggregate_neighbors(a, n_layers=3, use_rep="X_pca10")
    model = cc.tl.ClusterAutoK(
        n_clusters=(2, 10),
        max_runs=5,
        model_params={
            "random_state": seed,
            "trainer_params": {"accelerator": "cpu", "enable_progress_bar": False},
        },
    )
    with open(os.devnull, "w") as devnull:  # ClusterAutoK prints its iterations
        old, sys.stdout = sys.stdout, devnull
        try:
            model.fit(a, use_rep="X_cellcharter")
        finally:
            sys.stdout = old
    return np.asarray(model.predict(a, use_rep="X_cellcharter")).astype(str)


METHODS = {
    "squall.tl.niches gmm (stability k)": m_squall_gmm,
    "squall.tl.niches leiden": m_squall_leiden,
    "scanpy Leiden on expression (no space)": m_scanpy_leiden,
    "squidpy graph + scanpy Leiden (space only)": m_squidpy_space_leiden,
    "CellCharter 0.3.7 (ClusterAutoK)": m_cellcharter,
}


def each_method(base, seeds: list[int], cc_seeds: list[int], skip_cc: bool):
    """Run every method of :data:`METHODS` on a copy of ``base`` per seed.

    Yields ``(name, seed, adata, labels, seconds)``; CellCharter's seconds are those of the run that
    produced its (cached) labels.
    """
    for name, fn in METHODS.items():
        if fn is m_cellcharter and skip_cc:
            continue
        for seed in cc_seeds if fn is m_cellcharter else seeds:
            a = base.copy()
            t0 = time.perf_counter()
            labels = fn(a, seed)
            dt = m_cellcharter.cached_time if fn is m_cellcharter else time.perf_counter() - t0
            yield name, seed, a, labels, dt


def run_her2st(sections: tuple[str, ...], seeds: list[int], cc_seeds: list[int], skip_cc: bool) -> pd.DataFrame:
    import anndata as ad

    import squall_sd as squall

    rows = []
    raw = {sec: load_section(sec) for sec in sections}
    for sec in sections:
        for name, seed, a, labels, dt in each_method(_prep(raw[sec].copy()), seeds, cc_seeds, skip_cc):
            rows.append({"method": name, "section": sec, "seed": seed, "time_s": dt, **_scores(a, labels)})
            print(
                f"  {sec} {name} seed={seed}: ARI={rows[-1]['ari']:.3f} NMI={rows[-1]['nmi']:.3f} "
                f"k={rows[-1]['k']} ({dt:.1f}s)",
                flush=True,
            )
    # one joint fit on all sections (one model, consistent labels), scored per section; without and
    # with the per-section alignment of the representation (batch_key)
    import scanpy as sc

    for batch_key in (None, "section"):
        name = f"squall.tl.niches gmm, joint {'+'.join(sections)}" + (
            ", batch_key='section'" if batch_key else ", no correction"
        )
        for seed in seeds:
            parts = [_prep(raw[s].copy()) for s in sections]  # per-section normalisation
            joint = ad.concat(parts, join="inner")
            sc.pp.pca(joint, n_comps=50, random_state=seed)
            joint.obs["section"] = joint.obs["section"].astype("category")
            t0 = time.perf_counter()
            squall.tl.niches(joint, use_rep="X_pca", library_key="section", batch_key=batch_key, random_state=seed)
            dt = time.perf_counter() - t0
            for sec in sections:
                sub = joint[joint.obs["section"] == sec]
                rows.append(
                    {
                        "method": name,
                        "section": sec,
                        "seed": seed,
                        "time_s": dt / len(sections),
                        **_scores(sub, sub.obs["squall_niche"].to_numpy()),
                    }
                )
            print(f"  {name} seed={seed}: k={joint.uns['squall_niche']['n_niches']} ({dt:.1f}s)", flush=True)
    return pd.DataFrame(rows)


def he_inputs(sec: str, model_dir: str, validation: bool = False) -> dict[str, object]:
    """The inputs of section ``sec`` for the H&E comparison: measured counts, predicted expression and
    H&E embeddings from the model in ``model_dir``, each an AnnData with ``X_pca`` over the same spots.
    ``sec`` must be of a patient the model never saw, or with ``validation=True`` one of its validation
    sections (the development check of ``--from-he MODEL --dev``)."""
    import anndata as ad
    import scanpy as sc

    import squall_sd as squall

    sdata = squall.datasets.her2st(sec, SHARED / "her2st")
    if not sdata.images:
        raise SystemExit(f"{sec} has no H&E in {SHARED / 'her2st' / 'images'}")
    if validation:
        if sec not in _validated_on(Path(model_dir)):
            raise SystemExit(f"{sec} is not a validation section of {model_dir}")
    else:
        seen = _trained_on(Path(model_dir)).split(", ")
        if any(t[:1] == sec[:1] for t in seen):
            raise SystemExit(f"{model_dir} was trained on {', '.join(seen)}: patient {sec[:1]} is not held out.")
    model = squall.models.load(model_dir)
    table = sdata.tables["table"]
    table.obs_names = [f"{sec}_{n}" for n in table.obs_names]
    measured = _prep(table.copy())
    pred = squall.tl.predict_expression(sdata, model, progress=False, inplace=False)
    keep = pred.var["squall_predicted"].to_numpy()
    # the model predicts log1p(CP10k) per spot (region_reduce "mean"): PCA directly, no re-normalising
    predicted = ad.AnnData(np.asarray(pred.layers["squall"][:, keep], dtype=np.float32), obs=table.obs.copy(),
                           obsm={"spatial": np.asarray(table.obsm["spatial"])})
    sc.pp.pca(predicted, n_comps=50, random_state=0)
    emb = squall.tl.embed(sdata, model, progress=False, inplace=False)
    embedded = ad.AnnData(np.asarray(emb.obsm["X_squall"], dtype=np.float32), obs=table.obs.copy(),
                          obsm={"spatial": np.asarray(table.obsm["spatial"])})
    sc.pp.pca(embedded, n_comps=min(50, embedded.n_vars - 1), random_state=0)
    hand = ad.AnnData(hand_tile_features(sdata, model), obs=table.obs.copy(),
                      obsm={"spatial": np.asarray(table.obsm["spatial"])})
    sc.pp.scale(hand)
    sc.pp.pca(hand, n_comps=min(50, hand.n_vars - 1), random_state=0)
    return {"measured counts": measured, "predicted expression": predicted, "H&E embedding (X_squall)": embedded,
            "hand-made H&E features": hand}


def hand_tile_features(sdata, model) -> np.ndarray:
    """Image-only baseline: the her2st benchmark's hand-made colour/texture features (RGB and H/E/DAB
    statistics, gradients, LBP; ``_models.hand_features``) of one tile per spot, cut like the model's
    tiles (same field of view and µm/px, centred on the spot). The niche methods then aggregate them over
    the spatial graph exactly as they do the model's embeddings."""
    import _models as M
    import geopandas as gpd
    from spatialdata.transformations import get_transformation

    import squall_sd as squall

    spots = sdata.shapes["spots"]
    aff = get_transformation(spots, "microns").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = np.c_[spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy(), np.ones(len(spots))] @ aff.T
    table = sdata.tables["table"]
    inst = table.uns["spatialdata_attrs"]["instance_key"]
    pos = pd.Index(spots.index).get_indexer(table.obs[inst].to_numpy())
    assert isinstance(spots, gpd.GeoDataFrame) and (pos >= 0).all()
    c = model.config
    ds = squall.pp.extract_patches(sdata, xy[pos, :2], patch_px=int(c.img_size), mpp=float(c.mpp))
    tiles = np.asarray(ds.get_batch())
    if tiles.shape[1] == 3:
        tiles = tiles.transpose(0, 2, 3, 1)
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    tiles[tiles.max(axis=3) < 16] = 255  # A's blacked-out background -> white, as in the expression benchmark
    return M.hand_features(tiles, log=lambda *a: None).astype(np.float32)


def _trained_on(model_dir: Path) -> str:
    """The training sections of a model exported by ``squall train`` (its run's ``config.yaml``), if known."""
    from _her2st_data import run_sections

    sections = run_sections(model_dir)
    if sections is None:
        return "unknown (no config.yaml beside the model)"
    return ", ".join(sections["train"]) or "unknown"


def _validated_on(model_dir: Path) -> list[str]:
    """The validation sections of a model exported by ``squall train`` (empty if unknown)."""
    from _her2st_data import run_sections

    sections = run_sections(model_dir)
    return [] if sections is None else list(sections["val"])


def run_he(model_dir: str, seeds: list[int], cc_seeds: list[int], skip_cc: bool, dev: bool = False) -> pd.DataFrame:
    """Every method on measured counts, predicted expression and embeddings of the sections with an H&E:
    the labelled sections of :data:`SECTIONS`, or with ``dev`` the model's validation sections."""
    rows = []
    candidates = _validated_on(Path(model_dir)) if dev else SECTIONS
    for sec in [s for s in candidates if any((SHARED / "her2st" / "images").glob(f"{s}.*"))]:
        for inp, base in he_inputs(sec, model_dir, validation=dev).items():
            for name, seed, a, labels, _ in each_method(base, seeds, cc_seeds, skip_cc):
                rows.append({"input": inp, "method": name, "section": sec, "seed": seed, **_scores(a, labels)})
                print(f"  {sec} {inp} {name} seed={seed}: ARI={rows[-1]['ari']:.3f} NMI={rows[-1]['nmi']:.3f} "
                      f"k={rows[-1]['k']}", flush=True)
    return pd.DataFrame(rows)


def he_table(df: pd.DataFrame) -> str:
    lines = ["| section | input | method | seeds | ARI | NMI | k |", "|---|---|---|---|---|---|---|"]
    for (sec, inp, m), d in df.groupby(["section", "input", "method"], sort=False):
        sd = "" if len(d) == 1 else f" ± {d['ari'].std(ddof=0):.3f}"
        sn = "" if len(d) == 1 else f" ± {d['nmi'].std(ddof=0):.3f}"
        ks = "–".join(sorted({str(k) for k in d["k"]}, key=int))
        ari, nmi = f"{d['ari'].mean():.3f}{sd}", f"{d['nmi'].mean():.3f}{sn}"
        lines.append(f"| {sec} | {inp} | {m} | {len(d)} | {ari} | {nmi} | {ks} |")
    return "\n".join(lines)


def her2st_table(df: pd.DataFrame, sections: tuple[str, ...]) -> str:
    def fmt(x: pd.Series) -> str:
        return f"{x.mean():.3f}" if len(x) == 1 else f"{x.mean():.3f} ± {x.std(ddof=0):.3f}"

    order = list(dict.fromkeys(df["method"]))
    head = "| method | seeds | " + " | ".join(f"{s} ARI | {s} NMI" for s in sections)
    head += f" | mean ARI | mean NMI | k ({'/'.join(sections)}) | s per section |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in order:
        d = df[df["method"] == m]
        cells = []
        for s in sections:
            ds = d[d["section"] == s]
            cells += [fmt(ds["ari"]), fmt(ds["nmi"])]
        per_seed = d.groupby("seed")[["ari", "nmi"]].mean()
        ks = "/".join("–".join(sorted({str(k) for k in d[d["section"] == s]["k"]}, key=int)) for s in sections)
        lines.append(
            f"| {m} | {d['seed'].nunique()} | "
            + " | ".join(cells)
            + f" | **{fmt(per_seed['ari'])}** | **{fmt(per_seed['nmi'])}** | {ks} | {d['time_s'].mean():.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- Xenium scale
def xenium_child(method: str, candidates: str) -> None:
    """Run in a fresh process so ru_maxrss measures this workload only; prints one JSON line."""
    import scanpy as sc

    import squall_sd as squall

    t0 = time.perf_counter()
    adata = sc.read_10x_h5(XENIUM / "cell_feature_matrix.h5")
    cells = pd.read_csv(XENIUM / "cells.csv.gz")
    adata.obs_names = adata.obs_names.astype(str)
    cells.index = cells["cell_id"].astype(str)
    cells = cells.reindex(adata.obs_names)
    adata.obsm["spatial"] = cells[["x_centroid", "y_centroid"]].to_numpy()
    keep = np.asarray(adata.X.sum(1)).ravel() > 0
    adata = adata[keep].copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50, random_state=0)
    t_prep = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lo, hi = (int(x) for x in candidates.split("-"))
    tracemalloc.start()
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    if method == "gmm":
        squall.tl.niches(adata, use_rep="X_pca", n_niches=range(lo, hi + 1))
    else:
        squall.tl.niches(adata, use_rep="X_pca", method="leiden")
    wall = time.perf_counter() - t1
    cpu = time.process_time() - cpu1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # graph alone, for the breakdown
    t2 = time.perf_counter()
    from squall_sd.tl._utils import build_spatial_graph

    build_spatial_graph(
        adata,
        graph="radius",
        radius=None,
        n_neighs=6,
        library_key=None,
        spatial_key="spatial",
        key_added="g",
    )
    t_graph = time.perf_counter() - t2
    deg = np.diff(adata.obsp["g_connectivities"].indptr)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    p = adata.uns["squall_niche"]
    print(
        json.dumps(
            {
                "method": method,
                "n_cells": int(adata.n_obs),
                "n_genes": int(adata.n_vars),
                "prep_s": t_prep,
                "niches_wall_s": wall,
                "niches_cpu_s": cpu,
                "graph_s": t_graph,
                "tracemalloc_peak_mib": peak / 2**20,
                "rss_before_mib": rss_before,
                "rss_peak_mib": rss,
                "n_niches": int(p["n_niches"]),
                "candidates": candidates if method == "gmm" else "-",
                "subsample": p.get("subsample"),
                "selection_subsample": p.get("selection_subsample"),
                "radius_um": p["graph_params"].get("radius"),
                "mean_degree": float(deg.mean()),
            }
        ),
        flush=True,
    )


def run_xenium(candidates: str, methods: tuple[str, ...]) -> list[dict]:
    out = []
    for m in methods:
        proc = subprocess.run(
            [sys.executable, __file__, "--xenium-child", m, "--xenium-candidates", candidates],
            capture_output=True,
            text=True,
            check=False,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not line:
            raise RuntimeError(f"Xenium child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        out.append(json.loads(line[-1]))
        print(f"  xenium {m}: {out[-1]}", flush=True)
    return out


def xenium_table(rows: list[dict]) -> str:
    lines = [
        "| method | cells × genes | graph (radius, mean degree) | graph alone s | tl.niches wall s | CPU s | "
        "niches found | tracemalloc peak MiB | process peak RSS MiB (before → after) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = (
            f"squall gmm, k in {r['candidates']} chosen on {r['selection_subsample']} cells, "
            f"fit on {r['subsample']} cells"
            if r["method"] == "gmm"
            else "squall leiden"
        )
        lines.append(
            f"| {name} | {r['n_cells']:,} × {r['n_genes']} | {r['radius_um']:.1f} µm, {r['mean_degree']:.1f} | "
            f"{r['graph_s']:.2f} | {r['niches_wall_s']:.1f} | {r['niches_cpu_s']:.1f} | {r['n_niches']} | "
            f"{r['tracemalloc_peak_mib']:.0f} | {r['rss_before_mib']:.0f} → {r['rss_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cellcharter-seeds", type=int, default=1)
    ap.add_argument("--skip-cellcharter", action="store_true")
    ap.add_argument("--skip-xenium", action="store_true")
    ap.add_argument("--skip-her2st", action="store_true")
    ap.add_argument("--xenium-candidates", default="2-10")
    ap.add_argument("--xenium-child", default=None)
    ap.add_argument("--out", default=None, help="default results/niches.md (results/niches_dev.md with --dev)")
    ap.add_argument("--from-he", default=None, metavar="MODEL_DIR",
                    help="only the H&E comparison on A1 with this model (one trained without patient A); "
                    "writes results/niches_he.md")
    ap.add_argument(
        "--dev",
        action="store_true",
        help="development sections E1, F1, G2, H1 (patients not in the evaluation) scored against the authors' "
        "expression clusters instead of A1, C1, D1 against the pathologist; implies --skip-xenium. With "
        "--from-he: the H&E comparison on the model's validation sections against those clusters",
    )
    args = ap.parse_args()
    global REFERENCE
    sections = SECTIONS
    if args.dev:
        sections, REFERENCE, args.skip_xenium = DEV_SECTIONS, "her2st_cluster", True
    if args.out is None:
        name = ("niches_he_dev.md" if args.dev else "niches_he.md") if args.from_he else (
            "niches_dev.md" if args.dev else "niches.md")
        args.out = str(HERE / "results" / name)
    if args.xenium_child:
        xenium_child(args.xenium_child, args.xenium_candidates)
        return
    if args.quick:
        args.seeds, args.skip_cellcharter, args.xenium_candidates = 1, True, "4-8"
    import squall_sd

    cmd = "python benchmarks/niches.py " + " ".join(sys.argv[1:])
    parts = [
        "# Niche benchmark",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"squall-sd {squall_sd.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with other jobs (load average at start "
        f"{os.getloadavg()[0]:.1f}); BLAS/OpenMP threads = 1.",
        "",
    ]
    cc_ok = not args.skip_cellcharter
    if cc_ok:
        try:
            import cellcharter  # noqa: F401
        except ImportError:
            print("cellcharter not installed: skipping it (pip install cellcharter)")
            cc_ok = False
    if args.from_he:
        args.skip_her2st = args.skip_xenium = True
        df = run_he(args.from_he, list(range(args.seeds)), list(range(args.cellcharter_seeds)), not cc_ok, args.dev)
        df.to_csv(Path(args.out).with_suffix(".csv"), index=False)
        model = json.loads((Path(args.from_he) / "config.json").read_text())["config"]
        trained = _trained_on(Path(args.from_he))
        if args.dev:
            secs = ", ".join(dict.fromkeys(df["section"]))
            parts += [
                f"## Development check: {secs} (validation sections of the model) from the H&E alone",
                "",
                f"Model: `{args.from_he}` (`{model['name']}`, trained on: {trained}; {secs} chose its epoch). "
                "Inputs as in the A1 comparison; ARI / NMI against the her2st authors' expression clusters "
                "(`clusters/`), not pathologist labels; mean ± sd over seeds.",
                "",
                he_table(df),
                "",
            ]
        else:
            parts += [
                "## her2st A1 from its H&E alone",
                "",
                f"Model: `{args.from_he}` (`{model['name']}`, trained on: {trained}). It must not have seen "
                "patient A. Inputs over the same spots: the measured counts (CP10k + log1p → PCA), the expression it "
                "predicts from the H&E (log1p(CP10k) → PCA) and its H&E embeddings (`tl.embed`, `X_squall` → PCA). "
                "ARI / NMI against the pathologist's regions, mean ± sd over seeds; no method sees the labels.",
                "",
                he_table(df),
                "",
            ]
    if not args.skip_her2st:
        df = run_her2st(sections, list(range(args.seeds)), list(range(args.cellcharter_seeds)), not cc_ok)
        df.to_csv(Path(args.out).with_suffix(".her2st.csv"), index=False)
        if args.dev:
            head = [
                "## Development sections E1, F1, G2, H1: agreement with the authors' expression clusters",
                "",
                "Patients E-H (not in the evaluation; J1, the labelled development section, has no counts here). "
                "Reference: the her2st authors' per-section expression clusters (`clusters/`), not pathologist "
                "labels. Measured counts → CP10k + log1p → PCA (per section). Used to choose tl.niches' defaults.",
            ]
        else:
            n_lab = "; ".join(f"{s} {int(df[df['section'] == s]['n_scored'].iloc[0])}" for s in sections)
            head = [
                "## her2st A1, C1, D1: agreement with the pathologist's regions (held-out evaluation)",
                "",
                "Measured counts → CP10k + log1p → PCA (per section). ARI / NMI over spots with a pathologist label "
                f'other than "undetermined" ({n_lab} spots).',
            ]
        parts += head + [
            "mean ± sd over seeds. k = number of clusters found (range over seeds). No method sees the labels; "
            "tl.niches chooses k by stability.",
            "",
            her2st_table(df, sections),
            "",
        ]
    if not args.skip_xenium:
        methods = ("gmm", "leiden")
        rows = run_xenium(args.xenium_candidates, methods)
        parts += [
            "## Scale: Xenium mouse brain (36,602 cells)",
            "",
            "`cell_feature_matrix.h5` + `cells.csv.gz` (x/y centroids, µm) → CP10k + log1p → PCA 50 (not timed), "
            "then `squall.tl.niches` (squidpy radius graph, 3-hop aggregation of 10 PCs, clustering), each in a "
            "fresh process. tracemalloc peak: Python/numpy allocations during the call; RSS: the process "
            "(includes imports and the data).",
            "",
            xenium_table(rows),
            "",
        ]
    text = "\n".join(parts)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
