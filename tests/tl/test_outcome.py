"""Outcome machinery: Harrell's C and the Breslow Cox loss against references; attention MIL on
pseudo-slides cut from real her2st sections with SIMULATED outcomes (no real outcome data here)."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from sklearn.cluster import KMeans

import squall_sd as squall
from squall_sd.tl._outcome_net import _cox_loss, concordance_index


def _c_index_reference(time, event, risk):
    num = den = 0.0
    for i, j in itertools.permutations(range(len(time)), 2):
        if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
            den += 1
            num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_concordance_index_known_answers():
    t = np.array([1.0, 2, 3, 4])
    e = np.ones(4, bool)
    assert concordance_index(t, e, -t) == 1.0
    assert concordance_index(t, e, t) == 0.0
    assert concordance_index(t, e, np.zeros(4)) == 0.5
    rng = np.random.default_rng(0)
    for _ in range(5):
        t = rng.integers(1, 8, 40).astype(float)  # many tied times
        e = rng.random(40) < 0.6
        r = np.round(rng.normal(size=40), 1)  # tied risks
        assert concordance_index(t, e, r) == pytest.approx(_c_index_reference(t, e, r))


def test_cox_loss_breslow_reference():
    rng = np.random.default_rng(1)
    t = rng.integers(1, 5, 30).astype(float)
    e = rng.random(30) < 0.7
    r = rng.normal(size=30)
    ref = -np.mean([r[i] - np.log(np.exp(r[t >= t[i]]).sum()) for i in np.flatnonzero(e)])
    got = _cox_loss(torch.tensor(r, dtype=torch.float64), t, e).item()
    assert got == pytest.approx(ref, rel=1e-9)


@pytest.fixture(scope="module")
def tiles(shared_data):
    """Spots of three real her2st sections as 'tiles', cut into 36 pseudo-slides of ~30 spots.

    Embeddings: joint PCA of log-normalised expression. Outcomes are SIMULATED from each
    pseudo-slide's real composition (fraction of spots high in the immune signature), with
    exponential times and censoring.
    """
    parts = []
    for sec in ("C1", "D1", "E1"):
        t = squall.datasets.her2st(sec, shared_data / "her2st", labels=False).tables["table"]
        k = 12
        t.obs["slide"] = [f"{sec}_{i}" for i in KMeans(k, n_init=3, random_state=0).fit_predict(t.obsm["spatial"])]
        t.obs["patient"] = sec[0]
        t.obs_names = [f"{sec}_{n}" for n in t.obs_names]
        parts.append(t)
    adata = ad.concat(parts, join="inner")
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=16, random_state=0)
    adata.obsm["X_emb"] = adata.obsm["X_pca"]
    squall.tl.score_signatures(adata, ["immune"])
    adata.obs["immune_spot"] = adata.obs["sig_immune"] > adata.obs["sig_immune"].quantile(0.75)
    frac = adata.obs.groupby("slide")["immune_spot"].mean()
    rng = np.random.default_rng(0)
    log_h = -2.5 * (frac - frac.mean()) / frac.std()  # immune-rich slides do better
    time = rng.exponential(1.0 / np.exp(log_h))
    cens = rng.exponential(2.0 * np.median(time), size=len(time))
    out = pd.DataFrame(
        {
            "time": np.minimum(time, cens),
            "event": (time <= cens).astype(int),
            "log_hazard": log_h,
            "responder": (frac > frac.median()).astype(int),
        },
        index=frac.index,
    )
    return adata, out


def test_fit_predict_cox_simulated(tiles):
    adata, out = tiles
    adata = adata.copy()
    oracle = concordance_index(out["time"], out["event"], out["log_hazard"])
    model = squall.tl.fit_outcome(
        adata,
        embeddings="X_emb",
        outcomes=out,
        slide_key="slide",
        time="time",
        event="event",
        cv=3,
        epochs=80,
    )
    c = model.metrics["c_index"]
    assert len(c["per_fold"]) == 3
    assert 0.6 < c["pooled"] <= 1.0 and oracle > 0.6  # learns the simulated signal out of fold
    # out-of-fold attention: on every tile, sums to one per slide
    att = adata.obs["squall_outcome_attention"]
    assert att.notna().all()
    np.testing.assert_allclose(att.groupby(adata.obs["slide"]).sum(), 1.0, rtol=1e-5)
    slides = adata.uns["squall_outcome"]["slides"]
    assert set(slides.columns) >= {"risk", "fold", "time", "event"} and len(slides) == len(out)
    # final model on all slides ranks the training slides well; predict_outcome round trip
    pred = squall.tl.predict_outcome(adata, model, key_added="pred")
    assert list(pred.index) == sorted(out.index) and (pred["n_tiles"] > 0).all()
    assert concordance_index(out.loc[pred.index, "time"], out.loc[pred.index, "event"], pred["risk"]) > 0.7
    np.testing.assert_allclose(adata.obs["pred_attention"].groupby(adata.obs["slide"]).sum(), 1.0, rtol=1e-5)


def test_fit_outcome_copy_writes_nothing(tiles):
    adata, out = tiles
    adata = adata.copy()
    adata.obs["responder"] = out["responder"].reindex(adata.obs["slide"]).to_numpy()
    kw = {"embeddings": "X_emb", "response": "responder", "task": "binary", "cv": 3, "epochs": 5}
    obs, uns = list(adata.obs.columns), set(adata.uns)
    model = squall.tl.fit_outcome(adata, copy=True, **kw)
    assert list(adata.obs.columns) == obs and set(adata.uns) == uns
    again = squall.tl.fit_outcome(adata, **kw)
    assert "squall_outcome_attention" in adata.obs and "squall_outcome" in adata.uns
    assert all(torch.equal(model.state_dict[k], again.state_dict[k]) for k in model.state_dict)


def test_binary_grouped_and_outcomes_from_obs(tiles):
    adata, out = tiles
    adata = adata.copy()
    adata.obs["responder"] = out["responder"].reindex(adata.obs["slide"]).to_numpy()
    model = squall.tl.fit_outcome(
        adata, embeddings="X_emb", response="responder", task="binary", cv=3, epochs=60
    )  # outcomes read from obs (constant within each slide)
    assert model.metrics["auc"]["pooled"] > 0.6
    pred = model.predict(adata, copy=True)
    assert pred["probability"].between(0, 1).all()
    # grouped folds never split a patient (three patients here: leave-one-patient-out)
    adata.obs["patient_id"] = adata.obs["patient"].astype(str)
    grouped = squall.tl.fit_outcome(
        adata,
        embeddings="X_emb",
        response="responder",
        task="binary",
        cv=3,
        groups="patient_id",
        epochs=5,
    )
    assert grouped.cv_results.groupby("patient_id")["fold"].nunique().max() == 1
    assert grouped.cv_results["fold"].nunique() == 3


def test_errors(tiles):
    adata, out = tiles
    adata = adata.copy()
    with pytest.raises(KeyError, match=r"squall\.tl\.embed"):
        squall.tl.fit_outcome(adata, embeddings="X_squall", outcomes=out, time="time", event="event")
    with pytest.raises(ValueError, match="needs `time=` and `event=`"):
        squall.tl.fit_outcome(adata, embeddings="X_emb", outcomes=out, time="time")
    with pytest.raises(KeyError, match="slide_key"):
        squall.tl.fit_outcome(adata, embeddings="X_emb", outcomes=out, slide_key="wsi", time="time", event="event")
    with pytest.raises(KeyError, match="not found in `outcomes`"):
        squall.tl.fit_outcome(adata, embeddings="X_emb", outcomes=out, time="os_months", event="event")
    with pytest.raises(ValueError, match="0/1"):
        squall.tl.fit_outcome(adata, embeddings="X_emb", outcomes=out, response="time", task="binary")


def test_save_load_round_trip(tiles, tmp_path):
    adata, out = tiles
    adata = adata.copy()
    model = squall.tl.fit_outcome(
        adata,
        embeddings="X_emb",
        outcomes=out,
        slide_key="slide",
        time="time",
        event="event",
        cv=2,
        epochs=5,
    )
    target = tmp_path / "outcome_model"
    assert model.save(target) == target
    assert {p.name for p in target.iterdir()} == {"model.safetensors", "config.json", "cv_results.csv"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save(target)
    model.save(target, overwrite=True)
    loaded = squall.tl.OutcomeModel.load(target)
    assert (loaded.task, loaded.embeddings, loaded.slide_key) == (model.task, model.embeddings, model.slide_key)
    assert loaded.config == model.config
    assert loaded.metrics["c_index"]["per_fold"] == pytest.approx(model.metrics["c_index"]["per_fold"])
    np.testing.assert_allclose(loaded.mean, model.mean)
    np.testing.assert_allclose(loaded.std, model.std)
    assert set(loaded.state_dict) == set(model.state_dict)
    pd.testing.assert_frame_equal(loaded.cv_results, model.cv_results, check_dtype=False, check_names=False)
    a = squall.tl.predict_outcome(adata, model, copy=True)
    b = squall.tl.predict_outcome(adata, loaded, copy=True)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(FileNotFoundError, match="config.json"):
        squall.tl.OutcomeModel.load(tmp_path / "missing")
