"""Outcome machinery on SIMULATED outcomes tied to real her2st tissue composition (evaluation.md §4).

No public survival cohort with slides is available offline, so this validates the machinery
(gated-attention MIL, Cox partial likelihood with Breslow ties, Harrell's C, grouped cross-validation),
not clinical performance:

1. All 30 her2st sections with counts (patients A, C-H; 11,908 spots) are read, log-normalised and
   embedded by a joint PCA (32 components) standing in for tile embeddings (``X_squall``).
2. Each section is cut into spatially contiguous pseudo-slides of ~25 spots (k-means on coordinates).
3. Per spot, an immune spot = top quartile of the built-in ``immune`` signature, a tumour spot = top
   half of the ``her2_amplicon`` signature (scores of ``squall.tl.score_signatures``).
4. SIMULATED outcome per pseudo-slide: log hazard = -0.8 z(immune fraction) + 0.8 z(tumour fraction);
   time ~ Exponential(exp(log hazard)), independent exponential censoring (~40 %); binary response
   ~ Bernoulli(sigmoid(log hazard)).
5. ``squall.tl.fit_outcome`` with 5 folds over pseudo-slides, and with 5 folds grouped by patient
   (no patient in train and test), next to the oracle (the true log hazard scored the same way),
   a mean-pooling baseline, and a null control (outcomes permuted across slides: must give ~0.5).

    python benchmarks/outcome_simulation.py            # 3 simulation replicates (~30 min on 2 shared cores)
    python benchmarks/outcome_simulation.py --quick    # 1 replicate
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("SQUALL_SHARED_DATA", ROOT.parent / "shared" / "data"))
warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

SPOTS_PER_SLIDE = 25
BETA_IMMUNE, BETA_TUMOUR = -0.8, 0.8


def build_tiles(seed: int = 0):
    """Real her2st spots as tiles with PCA embeddings, pseudo-slides and signature-based spot types."""
    import anndata as ad
    import scanpy as sc
    from sklearn.cluster import KMeans

    cache = HERE / "results" / "cache" / f"outcome_tiles_seed{seed}.h5ad"
    if cache.exists():
        adata = ad.read_h5ad(cache)
        return adata, sorted(adata.obs["section"].astype(str).unique())

    import squall_sd as squall

    sections = sorted(p.name.split(".")[0] for p in (SHARED / "her2st" / "counts").glob("*.tsv.gz"))
    parts = []
    for sec in sections:
        t = squall.datasets.her2st(sec, SHARED / "her2st", labels=False).tables["table"]
        t.obs_names = [f"{sec}_{n}" for n in t.obs_names]
        k = max(2, round(t.n_obs / SPOTS_PER_SLIDE))
        reg = KMeans(k, n_init=3, random_state=seed).fit_predict(t.obsm["spatial"])
        t.obs["slide"] = [f"{sec}_r{r}" for r in reg]
        t.obs["patient"] = sec[0]
        sc.pp.normalize_total(t)
        sc.pp.log1p(t)
        parts.append(t)
    adata = ad.concat(parts, join="inner")
    sc.pp.pca(adata, n_comps=32, random_state=seed)
    adata.obsm["X_emb"] = adata.obsm["X_pca"]
    squall.tl.score_signatures(adata, ["immune", "her2_amplicon"])
    adata.obs["immune_spot"] = adata.obs["sig_immune"] > adata.obs["sig_immune"].quantile(0.75)
    adata.obs["tumour_spot"] = adata.obs["sig_her2_amplicon"] > adata.obs[
        "sig_her2_amplicon"
    ].quantile(0.5)
    cache.parent.mkdir(parents=True, exist_ok=True)
    obs = adata.obs[["section", "slide", "patient", "immune_spot", "tumour_spot"]]
    obs = obs.astype({"section": str, "slide": str, "patient": str})
    ad.AnnData(obs=obs, obsm={"X_emb": adata.obsm["X_emb"]}).write_h5ad(cache)
    return adata, sections


def simulate(adata, rng: np.random.Generator) -> pd.DataFrame:
    g = adata.obs.groupby("slide", observed=True)
    comp = pd.DataFrame(
        {
            "immune": g["immune_spot"].mean(),
            "tumour": g["tumour_spot"].mean(),
            "patient": g["patient"].first(),
        }
    )

    def z(x):
        return (x - x.mean()) / x.std()

    log_h = BETA_IMMUNE * z(comp["immune"]) + BETA_TUMOUR * z(comp["tumour"])
    t = rng.exponential(1.0 / np.exp(log_h))
    c = rng.exponential(2.5 * np.median(t), size=len(t))
    comp["time"] = np.minimum(t, c)
    comp["event"] = (t <= c).astype(int)
    comp["log_hazard"] = log_h
    comp["response"] = (rng.random(len(t)) < 1.0 / (1.0 + np.exp(-log_h))).astype(int)
    return comp


def attention_enrichment(adata, key: str) -> tuple[float, float]:
    """Mean attention × tiles-per-slide on immune / tumour spots (1 = uniform attention)."""
    n = adata.obs.groupby("slide", observed=True)["slide"].transform("size").to_numpy()
    rel = adata.obs[f"{key}_attention"].to_numpy() * n
    return float(np.nanmean(rel[adata.obs["immune_spot"].to_numpy()])), float(
        np.nanmean(rel[adata.obs["tumour_spot"].to_numpy()])
    )


def main() -> None:
    import squall_sd as squall
    from squall_sd.tl import concordance_index

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replicates", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "outcome.md"))
    args = ap.parse_args()
    n_rep = 1 if args.quick else args.replicates

    t0 = time.perf_counter()
    adata, sections = build_tiles()
    n_slides = adata.obs["slide"].nunique()
    print(
        f"{adata.n_obs} spots from {len(sections)} sections -> {n_slides} pseudo-slides "
        f"({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    from sklearn.metrics import roc_auc_score

    rows = []
    for rep in range(n_rep):
        rng = np.random.default_rng(100 + rep)
        out = simulate(adata, rng)
        common = {
            "embeddings": "X_emb",
            "outcomes": out,
            "slide_key": "slide",
            "cv": 5,
            "random_state": rep,
        }
        res = {"replicate": rep, "event_rate": out["event"].mean()}
        res["oracle_c"] = concordance_index(out["time"], out["event"], out["log_hazard"])
        res["oracle_auc"] = roc_auc_score(out["response"], out["log_hazard"])

        def run(name: str, res: dict = res, common: dict = common, **kw) -> None:
            t1 = time.perf_counter()
            m = squall.tl.fit_outcome(adata, key_added=name, **{**common, **kw})
            metric = "c_index" if kw.get("task", "cox") == "cox" else "auc"
            res[f"{name}_mean"] = m.metrics[metric]["mean"]
            res[f"{name}_pooled"] = m.metrics[metric]["pooled"]
            res[f"{name}_s"] = time.perf_counter() - t1

        run("mil", time="time", event="event")
        res["att_immune"], res["att_tumour"] = attention_enrichment(adata, "mil")
        run("mil_patient", time="time", event="event", groups="patient")
        run("meanpool", time="time", event="event", pooling="mean")
        run("mil_binary", response="response", task="binary")
        null = out.copy()
        null[["time", "event"]] = null[["time", "event"]].to_numpy()[rng.permutation(len(null))]
        run("null", time="time", event="event", outcomes=null)
        rows.append(res)
        print({k: round(float(v), 3) for k, v in res.items()}, flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(Path(args.out).with_suffix(".csv"), index=False)

    def ms(col: str) -> str:
        return f"{df[col].mean():.3f} ± {df[col].std(ddof=0):.3f}"

    n_pat = adata.obs["patient"].nunique()
    table = "\n".join(
        [
            "| SIMULATED outcome | C-index / AUC (mean ± sd over replicates) |",
            "|---|---|",
            f"| **oracle C-index** (true simulated log hazard) | **{ms('oracle_c')}** |",
            "| **fit_outcome attention MIL, 5-fold CV by slide** (mean over folds) | "
            f"**{ms('mil_mean')}** |",
            f"| same, pooled out-of-fold C-index | {ms('mil_pooled')} |",
            f"| fit_outcome attention MIL, 5-fold CV grouped by patient ({n_pat} patients) | "
            f"{ms('mil_patient_mean')} |",
            f'| mean-pooling baseline (`pooling="mean"`), 5-fold CV by slide | {ms("meanpool_mean")} |',
            f"| null control (outcomes permuted across slides), 5-fold CV by slide | {ms('null_mean')} |",
            f"| oracle AUC (binary response) | {ms('oracle_auc')} |",
            f"| fit_outcome attention MIL, binary, 5-fold CV by slide, AUC | {ms('mil_binary_mean')} |",
            f"| out-of-fold attention on immune spots (× uniform; slide CV) | {ms('att_immune')} |",
            f"| out-of-fold attention on tumour spots (× uniform; slide CV) | {ms('att_tumour')} |",
            f"| event rate | {ms('event_rate')} |",
            f"| pseudo-slides (sections / patients) | {n_slides} ({len(sections)} / {n_pat}) |",
            f"| fit_outcome wall time (Cox, 5 folds + final fit) | {df['mil_s'].mean():.0f} s |",
        ]
    )
    cmd = "python benchmarks/outcome_simulation.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Outcome machinery on simulated outcomes (her2st tissue composition)",
            "",
            "**All outcomes here are SIMULATED**; the tissue, expression and spot composition are real her2st data.",
            "",
            f"Command: `{cmd.strip()}`  ",
            f"squall-sd {squall.__version__}, Python {platform.python_version()}, {os.cpu_count()} shared CPU cores; "
            f"{n_rep} simulation replicates; log hazard = {BETA_IMMUNE} z(immune fraction) + {BETA_TUMOUR} "
            f"z(tumour fraction); ~{SPOTS_PER_SLIDE} spots per pseudo-slide; embeddings = joint PCA (32) of "
            "log-normalised expression.",
            "",
            table,
            "",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
