"""Slide-level outcome prediction: gated-attention MIL over tile embeddings (Cox or binary)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from squall_sd._logging import logger
from squall_sd.tl._utils import provenance, resolve_adata

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

__all__ = ["OutcomeModel", "concordance_index", "fit_outcome", "predict_outcome"]


# --------------------------------------------------------------------------------------------
# metrics and losses
# --------------------------------------------------------------------------------------------
def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of a risk score (higher risk = earlier event).

    A pair is comparable when the observation with the shorter time had an event (or both share
    a time and only that one had an event); it is concordant when that observation has the higher
    risk. Ties in risk count one half.

    Parameters
    ----------
    time
        Follow-up times.
    event
        1 (or ``True``) when the event was observed, 0 when censored.
    risk
        Predicted risk (e.g. a log hazard ratio).

    Returns
    -------
    The C-index in [0, 1] (0.5: random; NaN if no pair is comparable).

    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=float)
    if not (time.shape == event.shape == risk.shape) or time.ndim != 1:
        raise ValueError("`time`, `event` and `risk` must be 1-D arrays of the same length.")
    num = 0.0
    den = 0
    for i in np.flatnonzero(event):  # O(n^2) overall: fine up to ~10^4 slides
        later = (time > time[i]) | ((time == time[i]) & ~event)
        n = int(later.sum())
        if n == 0:
            continue
        den += n
        num += float(np.sum(risk[i] > risk[later]) + 0.5 * np.sum(risk[i] == risk[later]))
    return num / den if den else float("nan")


def _cox_loss(risk: torch.Tensor, time: np.ndarray, event: np.ndarray) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events."""
    import torch

    order = np.argsort(-time, kind="stable")  # descending time: risk set = prefix
    t_sorted = time[order]
    # index of the last observation whose time >= t_i (all ties included: Breslow)
    last = np.searchsorted(-t_sorted, -t_sorted, side="right") - 1
    r = risk[torch.as_tensor(order)]
    lse = torch.logcumsumexp(r, dim=0)[torch.as_tensor(last)]
    ev = torch.as_tensor(event[order].astype(bool))
    if not bool(ev.any()):
        return r.sum() * 0.0
    return -(r[ev] - lse[ev]).sum() / ev.sum()


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def _build_net(in_dim: int, hidden_dim: int, attention_dim: int, dropout: float, pooling: str) -> Any:
    import torch
    from torch import nn

    class GatedAttentionMIL(nn.Module):
        """Gated attention MIL (Ilse, Tomczak & Welling 2018) with a scalar slide output."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            self.att_v = nn.Linear(hidden_dim, attention_dim)
            self.att_u = nn.Linear(hidden_dim, attention_dim)
            self.att_w = nn.Linear(attention_dim, 1)
            self.head = nn.Linear(hidden_dim, 1)
            self.pooling = pooling

        def forward(self, x: torch.Tensor, seg: torch.Tensor, n_seg: int) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.encoder(x)
            if self.pooling == "mean":
                s = torch.zeros(x.shape[0], device=x.device)
            else:
                s = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)
            # softmax within each slide (segment softmax)
            smax = torch.full((n_seg,), -torch.inf, device=x.device).scatter_reduce(
                0, seg, s, reduce="amax", include_self=True
            )
            e = torch.exp(s - smax[seg])
            denom = torch.zeros(n_seg, device=x.device).index_add(0, seg, e)
            a = e / denom[seg]
            z = torch.zeros(n_seg, h.shape[1], device=x.device).index_add(0, seg, a[:, None] * h)
            return self.head(z).squeeze(-1), a

    return GatedAttentionMIL()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class OutcomeModel:
    """A slide-level outcome model fitted by :func:`fit_outcome`.

    Write it with :meth:`save` (safetensors weights + JSON) and read it back with :meth:`load`.

    Attributes
    ----------
    task
        ``"cox"`` (output: log relative hazard) or ``"binary"`` (output: logit).
    embeddings
        Key of ``obsm`` with the tile embeddings the model was trained on.
    slide_key
        Column of ``obs`` naming the slide of each tile.
    config
        Architecture and training parameters.
    state_dict
        Weights of the final model (trained on all slides).
    mean, std
        Standardisation of the embeddings (training tiles).
    cv_results
        Out-of-fold predictions per slide (``risk``, ``fold`` and the outcome columns).
    metrics
        Cross-validated metrics (``c_index`` or ``auc``: per fold, mean, sd, pooled).

    """

    task: str
    embeddings: str
    slide_key: str
    config: dict[str, Any]
    state_dict: dict[str, Any]
    mean: np.ndarray
    std: np.ndarray
    cv_results: pd.DataFrame | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def predict(self, data: AnnData | SpatialData, **kwargs: Any) -> pd.DataFrame:
        """Shortcut for :func:`predict_outcome` with this model."""
        return predict_outcome(data, self, **kwargs)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the model to a directory: weights as safetensors, everything else as JSON / CSV.

        The directory holds ``model.safetensors`` (network weights and the embedding
        standardisation), ``config.json`` (task, keys, architecture, metrics) and, when the model
        was cross-validated, ``cv_results.csv``. The files are written to a temporary directory
        next to ``path`` which then replaces ``path`` in one rename, so an interrupted save never
        leaves a half-written model.

        Parameters
        ----------
        path
            Output directory.
        overwrite
            Replace an existing model at ``path`` instead of raising :class:`FileExistsError`.

        Returns
        -------
        The directory.

        """
        import torch
        from safetensors.torch import save_file

        from squall_sd import __version__
        from squall_sd._sdata._write import staged

        path = Path(path).expanduser()
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass `overwrite=True` to replace it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": torch.as_tensor(v).detach().cpu().contiguous() for k, v in self.state_dict.items()}
        tensors["embedding_mean"] = torch.as_tensor(np.asarray(self.mean, dtype=np.float32)).contiguous()
        tensors["embedding_std"] = torch.as_tensor(np.asarray(self.std, dtype=np.float32)).contiguous()
        meta = {
            "format": _OUTCOME_FORMAT,
            "format_version": 1,
            "squall_sd_version": __version__,
            "task": self.task,
            "embeddings": self.embeddings,
            "slide_key": self.slide_key,
            "config": self.config,
            "metrics": self.metrics,
            "weights_file": "model.safetensors",
            "cv_results_file": None if self.cv_results is None else "cv_results.csv",
        }
        with staged(path) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if self.cv_results is not None:
                self.cv_results.to_csv(tmp / "cv_results.csv", index_label="__slide__")
            (tmp / "config.json").write_text(json.dumps(_jsonable(meta), indent=2) + "\n")
        logger.info("Saved outcome model to %s", path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OutcomeModel:
        """Read a model written by :meth:`save`.

        Parameters
        ----------
        path
            Directory written by :meth:`save`.

        Returns
        -------
        The model, ready for :func:`predict_outcome`.

        """
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"No outcome model at {path} (missing config.json).")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != _OUTCOME_FORMAT:
            raise ValueError(f"{cfg_file} is not a squall outcome model (format {meta.get('format')!r}).")
        tensors = load_file(str(path / meta.get("weights_file", "model.safetensors")))
        state = {k[len("net.") :]: v for k, v in tensors.items() if k.startswith("net.")}
        cv = None
        if meta.get("cv_results_file"):
            cv = pd.read_csv(path / meta["cv_results_file"], index_col="__slide__")
            cv.index.name = None
        return cls(
            task=meta["task"],
            embeddings=meta["embeddings"],
            slide_key=meta["slide_key"],
            config=meta["config"],
            state_dict=state,
            mean=tensors["embedding_mean"].numpy(),
            std=tensors["embedding_std"].numpy(),
            cv_results=cv,
            metrics=meta.get("metrics", {}),
        )


_OUTCOME_FORMAT = "squall-sd-outcome-model"


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars / arrays and tuples inside ``obj`` to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else obj
    return obj


def _slide_codes(adata: AnnData, slide_key: str) -> tuple[np.ndarray, pd.Index]:
    if slide_key not in adata.obs:
        raise KeyError(
            f"`slide_key={slide_key!r}` not found in `adata.obs`; available: "
            f"{list(adata.obs.columns)}. "
            "The tiles of all slides go into one AnnData with a column naming each tile's slide."
        )
    cat = pd.Categorical(adata.obs[slide_key].astype(str))
    return cat.codes.astype(np.int64), pd.Index(cat.categories, name=slide_key)


def _embeddings(adata: AnnData, key: str) -> np.ndarray:
    if key not in adata.obsm:
        raise KeyError(
            f"Embeddings `adata.obsm[{key!r}]` not found; available: {list(adata.obsm.keys())}. "
            f"Compute them with `squall.tl.embed(sdata, model, key_added={key!r})` (or pass "
            "`embeddings=`)."
        )
    X = adata.obsm[key]
    X = X.to_numpy() if isinstance(X, pd.DataFrame) else np.asarray(X)
    if not np.isfinite(X).all():
        raise ValueError(f"`adata.obsm[{key!r}]` contains NaN or infinite values.")
    return X.astype(np.float32)


def _outcome_table(
    adata: AnnData,
    outcomes: pd.DataFrame | None,
    slides: pd.Index,
    slide_key: str,
    cols: list[str],
) -> pd.DataFrame:
    if outcomes is None:
        missing = [c for c in cols if c not in adata.obs]
        if missing:
            raise KeyError(
                f"Outcome columns {missing} not found in `adata.obs`; pass `outcomes=` a "
                "DataFrame indexed "
                f"by slide id with columns {cols}."
            )
        grp = adata.obs[[slide_key, *cols]].astype({slide_key: str}).groupby(slide_key, observed=True)
        if (grp.nunique(dropna=False) > 1).any().any():
            raise ValueError(f"Outcome columns {cols} must be constant within each slide.")
        table = grp.first()
    else:
        missing = [c for c in cols if c not in outcomes.columns]
        if missing:
            raise KeyError(f"Outcome columns {missing} not found in `outcomes`; available: {list(outcomes.columns)}.")
        table = outcomes.copy()
        if slide_key in table.columns:
            table = table.set_index(slide_key)
        table.index = table.index.astype(str)
        if table.index.duplicated().any():
            raise ValueError("`outcomes` has duplicated slide ids.")
    absent = slides.difference(table.index)
    if len(absent) == len(slides):
        raise KeyError(
            f"No slide of `obs[{slide_key!r}]` (e.g. {list(slides[:3])}) is in the outcome "
            "table index "
            f"(e.g. {list(table.index[:3])})."
        )
    if len(absent):
        logger.warning(
            "%d slides have no outcome and are left out of training: %s",
            len(absent),
            list(absent[:5]),
        )
    table = table.reindex(slides)[cols]
    bad = table.isna().any(axis=1)
    return table[~bad]


def _train(
    X: np.ndarray,
    seg: np.ndarray,
    y: dict[str, np.ndarray],
    *,
    task: str,
    cfg: dict[str, Any],
    seed: int,
) -> Any:
    """Fit one network on the slides indexed ``0..n-1`` by ``seg``."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_seg = int(seg.max()) + 1
    net = _build_net(X.shape[1], cfg["hidden_dim"], cfg["attention_dim"], cfg["dropout"], cfg["pooling"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    Xt = torch.as_tensor(X)
    segt = torch.as_tensor(seg)
    order = np.argsort(seg, kind="stable")
    bounds = np.searchsorted(seg[order], np.arange(n_seg + 1))
    max_tiles = cfg["max_tiles"]
    target = torch.as_tensor(y["response"], dtype=torch.float32) if task == "binary" else None
    net.train()
    for _ in range(cfg["epochs"]):
        if max_tiles is not None and np.diff(bounds).max() > max_tiles:
            idx = np.concatenate(
                [
                    order[lo:hi] if hi - lo <= max_tiles else rng.choice(order[lo:hi], max_tiles, replace=False)
                    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
                ]
            )
            xb, sb = Xt[idx], segt[idx]
        else:
            xb, sb = Xt, segt
        out, _ = net(xb, sb, n_seg)
        if task == "cox":
            loss = _cox_loss(out, y["time"], y["event"])
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net


def _predict_net(net: Any, X: np.ndarray, seg: np.ndarray, n_seg: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        out, att = net(torch.as_tensor(X), torch.as_tensor(seg), n_seg)
    return out.numpy().astype(float), att.numpy().astype(float)


def _score(task: str, y: pd.DataFrame, risk: np.ndarray, cols: list[str]) -> float:
    if task == "cox":
        return concordance_index(y[cols[0]].to_numpy(), y[cols[1]].to_numpy(), risk)
    from sklearn.metrics import roc_auc_score

    resp = y[cols[0]].to_numpy().astype(int)
    return float(roc_auc_score(resp, risk)) if len(np.unique(resp)) == 2 else float("nan")


def fit_outcome(
    slides: AnnData | SpatialData,
    *,
    embeddings: str = "X_squall",
    outcomes: pd.DataFrame | None = None,
    slide_key: str = "slide",
    time: str | None = None,
    event: str | None = None,
    response: str | None = None,
    task: Literal["cox", "binary"] = "cox",
    cv: int | None = 5,
    groups: str | None = None,
    pooling: Literal["attention", "mean"] = "attention",
    hidden_dim: int = 64,
    attention_dim: int = 32,
    dropout: float = 0.25,
    epochs: int = 150,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    max_tiles: int | None = 1024,
    table_key: str | None = None,
    key_added: str = "squall_outcome",
    random_state: int = 0,
    n_jobs: int | None = 1,
) -> OutcomeModel:
    """Fit a slide-level outcome model on tile embeddings, with cross-validation.

    Each slide is a bag of tiles. A gated-attention multiple-instance network (Ilse et al. 2018)
    encodes every tile embedding, weighs the tiles by learned attention (softmax within the slide)
    and maps the attention-pooled slide vector to one number: a log relative hazard trained with
    the Cox partial likelihood (Breslow ties) for ``task="cox"``, or a logit trained with binary
    cross-entropy for ``task="binary"``. Slides are split into ``cv`` stratified folds (grouped by
    ``groups``, e.g. patient, when given); out-of-fold predictions give Harrell's C-index or the
    ROC AUC. A final model is then trained on all slides.

    Parameters
    ----------
    slides
        AnnData of tiles (or SpatialData with such a table) with ``obs[slide_key]`` and
        ``obsm[embeddings]``.
    embeddings
        Key of ``obsm`` with the tile embeddings (e.g. from :func:`squall_sd.tl.embed`).
    outcomes
        Per-slide outcomes indexed by slide id (or with a ``slide_key`` column). ``None``: read
        the outcome columns from ``obs`` (constant within each slide).
    slide_key
        Column of ``obs`` naming each tile's slide.
    time
        Column with follow-up time (``task="cox"``).
    event
        Column with the event indicator, 1 = event, 0 = censored (``task="cox"``).
    response
        Column with a binary response (``task="binary"``).
    task
        ``"cox"`` (survival) or ``"binary"``.
    cv
        Number of cross-validation folds; ``None`` or ``0``: no cross-validation.
    groups
        Column of the outcome table (e.g. patient) whose slides stay in the same fold.
    pooling
        ``"attention"`` (gated attention) or ``"mean"`` (a mean-pooling baseline).
    hidden_dim
        Width of the tile encoder.
    attention_dim
        Width of the attention network.
    dropout
        Dropout after the tile encoder.
    epochs
        Full-batch training epochs (all training slides per step).
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    max_tiles
        During training, at most this many randomly drawn tiles per slide and epoch (all tiles at
        prediction). ``None``: all tiles.
    table_key
        Table of a SpatialData input (default ``"table"``).
    key_added
        Name of the outputs.
    random_state
        Seed of the folds and the networks.
    n_jobs
        Torch threads while training (``None``: leave torch's setting).

    Returns
    -------
    The fitted :class:`OutcomeModel` (use :func:`predict_outcome` on new slides). Also writes

    - :attr:`anndata.AnnData.obs` ``[f"{key_added}_attention"]`` - out-of-fold attention of each
      tile (sums to one within a slide; NaN without ``cv`` or for slides without outcome),
    - :attr:`anndata.AnnData.uns` ``[key_added]`` - out-of-fold risk per slide (``"slides"``
      table), cross-validated metrics and parameters.

    Raises
    ------
    KeyError
        If the embeddings, the slide column or an outcome column is missing.
    ValueError
        If the outcome columns do not match ``task`` or there are too few slides.

    """
    adata = resolve_adata(slides, table_key)
    if task == "cox":
        if time is None or event is None:
            raise ValueError("`task='cox'` needs `time=` and `event=` (column names of the outcome table).")
        cols = [time, event]
    elif task == "binary":
        if response is None:
            raise ValueError("`task='binary'` needs `response=` (a column of the outcome table).")
        cols = [response]
    else:
        raise ValueError(f"Expected `task` to be 'cox' or 'binary', found {task!r}.")
    if pooling not in ("attention", "mean"):
        raise ValueError(f"Expected `pooling` to be 'attention' or 'mean', found {pooling!r}.")
    X = _embeddings(adata, embeddings)
    codes, slide_ids = _slide_codes(adata, slide_key)
    want = cols + ([groups] if groups is not None else [])
    table = _outcome_table(adata, outcomes, slide_ids, slide_key, want)
    if task == "binary":
        vals = set(np.unique(table[response].astype(float)))
        if not vals <= {0.0, 1.0}:
            raise ValueError(f"`response` must be 0/1 (or boolean), found values {sorted(vals)[:5]}.")
    else:
        if (table[time].astype(float) < 0).any():
            raise ValueError("Survival times must be non-negative.")
        if table[event].astype(float).sum() == 0:
            raise ValueError("No event in the outcome table: the Cox model cannot be fitted.")
    if len(table) < 4:
        raise ValueError(f"Need at least 4 slides with outcomes, found {len(table)}.")

    # keep tiles of slides with outcomes; re-index slides 0..n-1 in table order
    slide_pos = pd.Series(np.arange(len(table)), index=table.index)
    tile_slide = slide_ids[codes]
    keep = np.asarray(tile_slide.isin(table.index))
    tile_idx = np.flatnonzero(keep)
    seg_all = slide_pos.reindex(tile_slide[keep]).to_numpy().astype(np.int64)
    Xk = X[keep]

    cfg = {
        "hidden_dim": int(hidden_dim),
        "attention_dim": int(attention_dim),
        "dropout": float(dropout),
        "pooling": pooling,
        "epochs": int(epochs),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "max_tiles": None if max_tiles is None else int(max_tiles),
    }

    def targets(rows: np.ndarray) -> dict[str, np.ndarray]:
        sub = table.iloc[rows]
        if task == "cox":
            return {
                "time": sub[time].to_numpy(float),
                "event": sub[event].to_numpy(float).astype(bool),
            }
        return {"response": sub[response].to_numpy(float)}

    def subset(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        remap = -np.ones(len(table), dtype=np.int64)
        remap[rows] = np.arange(len(rows))
        m = remap[seg_all] >= 0
        return Xk[m], remap[seg_all][m], np.flatnonzero(m)

    def fit_rows(rows: np.ndarray, seed: int) -> tuple[Any, np.ndarray, np.ndarray]:
        Xtr, segtr, _ = subset(rows)
        mean, std = Xtr.mean(0), Xtr.std(0)
        std = np.where(std > 0, std, 1.0).astype(np.float32)
        net = _train((Xtr - mean) / std, segtr, targets(rows), task=task, cfg=cfg, seed=seed)
        return net, mean, std

    oof = np.full(len(table), np.nan)
    fold_of = np.full(len(table), -1)
    att_all = np.full(adata.n_obs, np.nan)
    fold_scores: list[float] = []
    with _torch_threads(n_jobs):
        if cv:
            splits = _splits(table, task, cols, groups, int(cv), random_state)
            for f, (tr, te) in enumerate(splits):
                net, mean, std = fit_rows(tr, random_state + f)
                Xte, segte, pos = subset(te)
                risk, att = _predict_net(net, (Xte - mean) / std, segte, len(te))
                oof[te] = risk
                fold_of[te] = f
                att_all[tile_idx[pos]] = att
                fold_scores.append(_score(task, table.iloc[te], risk, cols))
                logger.info("Fold %d/%d: %s = %.3f", f + 1, len(splits), _metric(task), fold_scores[-1])
        net, mean, std = fit_rows(np.arange(len(table)), random_state)

    metric = _metric(task)
    metrics: dict[str, Any] = {}
    cv_table = None
    if cv:
        pooled = _score(task, table, oof, cols)
        metrics = {
            metric: {
                "per_fold": np.asarray(fold_scores),
                "mean": float(np.nanmean(fold_scores)),
                "sd": float(np.nanstd(fold_scores)),
                "pooled": float(pooled),
            }
        }
        cv_table = table.copy()
        cv_table["risk"] = oof
        cv_table["fold"] = fold_of
        logger.info(
            "Cross-validated %s: %.3f ± %.3f over %d folds (pooled out-of-fold %.3f)",
            metric,
            metrics[metric]["mean"],
            metrics[metric]["sd"],
            len(fold_scores),
            pooled,
        )
    model = OutcomeModel(
        task=task,
        embeddings=embeddings,
        slide_key=slide_key,
        config={**cfg, "in_dim": int(X.shape[1])},
        state_dict={k: v.detach().clone() for k, v in net.state_dict().items()},
        mean=mean,
        std=std,
        cv_results=cv_table,
        metrics=metrics,
    )
    adata.obs[f"{key_added}_attention"] = att_all
    adata.uns[key_added] = provenance(
        task=task,
        embeddings=embeddings,
        slide_key=slide_key,
        outcome_columns=want,
        cv=int(cv or 0),
        random_state=int(random_state),
        config=cfg,
        metrics=metrics,
        slides=cv_table if cv_table is not None else table.copy(),
    )
    logger.info("Adding `adata.obs['%s_attention']`, `adata.uns[%r]`", key_added, key_added)
    return model


def _metric(task: str) -> str:
    return "c_index" if task == "cox" else "auc"


def _splits(
    table: pd.DataFrame, task: str, cols: list[str], groups: str | None, cv: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    n = len(table)
    strata = table[cols[1] if task == "cox" else cols[0]].astype(float).astype(int).to_numpy()
    if cv < 2:
        raise ValueError(f"Expected `cv` >= 2 (or None), found {cv}.")
    if groups is not None:
        g = table[groups].astype(str).to_numpy()
        if len(np.unique(g)) < cv:
            raise ValueError(
                f"`cv={cv}` folds need at least {cv} distinct `{groups}` values, found {len(np.unique(g))}."
            )
        if np.bincount(strata).min() >= cv:
            splitter = StratifiedGroupKFold(cv, shuffle=True, random_state=seed)
        else:
            splitter = GroupKFold(cv)
        return list(splitter.split(np.zeros(n), strata, g))
    if n < cv:
        raise ValueError(f"`cv={cv}` folds need at least {cv} slides, found {n}.")
    if np.bincount(strata).min() >= cv:
        return list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(n), strata))
    return list(KFold(cv, shuffle=True, random_state=seed).split(np.zeros(n)))


def predict_outcome(
    data: AnnData | SpatialData,
    model: OutcomeModel,
    *,
    table_key: str | None = None,
    slide_key: str | None = None,
    embeddings: str | None = None,
    key_added: str = "squall_outcome",
    copy: bool = False,
) -> pd.DataFrame:
    """Predict slide-level risk (or response probability) and tile attention with a fitted model.

    Parameters
    ----------
    data
        AnnData of tiles (or SpatialData with such a table).
    model
        Model from :func:`fit_outcome`.
    table_key
        Table of a SpatialData input (default ``"table"``).
    slide_key
        Column of ``obs`` naming each tile's slide (default: the model's).
    embeddings
        Key of ``obsm`` with tile embeddings (default: the model's).
    key_added
        Name of the outputs.
    copy
        Do not write into ``data``; only return the table.

    Returns
    -------
    Per-slide DataFrame with ``risk`` (log relative hazard for Cox, logit for binary),
    ``probability`` (binary only) and ``n_tiles``. Unless ``copy=True`` also writes

    - :attr:`anndata.AnnData.obs` ``[f"{key_added}_attention"]`` - tile attention (sums to one
      per slide),
    - :attr:`anndata.AnnData.uns` ``[f"{key_added}_prediction"]`` - the returned table.

    """
    import torch

    adata = resolve_adata(data, table_key)
    slide_key = slide_key or model.slide_key
    embeddings = embeddings or model.embeddings
    X = _embeddings(adata, embeddings)
    if X.shape[1] != model.config["in_dim"]:
        raise ValueError(
            f"`obsm[{embeddings!r}]` has {X.shape[1]} dimensions, the model expects "
            f"{model.config['in_dim']}: "
            "use the same embedding model as for training."
        )
    codes, slide_ids = _slide_codes(adata, slide_key)
    cfg = model.config
    net = _build_net(cfg["in_dim"], cfg["hidden_dim"], cfg["attention_dim"], cfg["dropout"], cfg["pooling"])
    net.load_state_dict({k: torch.as_tensor(v) for k, v in model.state_dict.items()})
    net.eval()
    risk, att = _predict_net(net, (X - model.mean) / model.std, codes, len(slide_ids))
    out = pd.DataFrame({"risk": risk, "n_tiles": np.bincount(codes, minlength=len(slide_ids))}, index=slide_ids)
    if model.task == "binary":
        out.insert(1, "probability", 1.0 / (1.0 + np.exp(-risk)))
    if not copy:
        adata.obs[f"{key_added}_attention"] = att
        adata.uns[f"{key_added}_prediction"] = out
        logger.info("Adding `adata.obs['%s_attention']`, `adata.uns['%s_prediction']`", key_added, key_added)
    return out
