"""Slide-level outcome prediction: gated-attention MIL over tile embeddings (Cox or binary).

The network, its loss and metrics are in :mod:`squall_sd.tl._outcome_net`; reading embeddings,
slides and outcomes and splitting folds in :mod:`squall_sd.tl._outcome_data`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import resolve_adata
from squall_sd.tl._outcome_data import (
    _check_outcomes,
    _embeddings,
    _jsonable,
    _outcome_columns,
    _outcome_table,
    _slide_codes,
    _splits,
)
from squall_sd.tl._outcome_net import (
    _build_net,
    _cv_metrics,
    _metric,
    _predict_net,
    _score,
    _SlideBags,
    _torch_threads,
    concordance_index,
)
from squall_sd.tl._utils import provenance

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["OutcomeModel", "concordance_index", "fit_outcome", "predict_outcome"]


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


@d.dedent
def fit_outcome(  # noqa: D417 - parameters from squall_sd._docs
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
    copy: bool = False,
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
    %(table_key_data)s
    %(key_added)s
    random_state
        Seed of the folds and the networks.
    n_jobs
        Torch threads while training (``None``: leave torch's setting).
    copy
        Do not write into ``slides``; only return the model.

    Returns
    -------
    The fitted :class:`OutcomeModel` (use :func:`predict_outcome` on new slides). Unless
    ``copy=True`` also writes

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
    cols = _outcome_columns(task, time=time, event=event, response=response, pooling=pooling)
    X = _embeddings(adata, embeddings)
    codes, slide_ids = _slide_codes(adata, slide_key)
    want = cols + ([groups] if groups is not None else [])
    table = _outcome_table(adata, outcomes, slide_ids, slide_key, want)
    _check_outcomes(table, task, cols)

    # keep tiles of slides with outcomes; re-index slides 0..n-1 in table order
    slide_pos = pd.Series(np.arange(len(table)), index=table.index)
    tile_slide = slide_ids[codes]
    keep = np.asarray(tile_slide.isin(table.index))
    tile_idx = np.flatnonzero(keep)
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
    bags = _SlideBags(
        X=X[keep],
        seg=slide_pos.reindex(tile_slide[keep]).to_numpy().astype(np.int64),
        table=table,
        task=task,
        cols=cols,
        cfg=cfg,
    )

    oof = np.full(len(table), np.nan)
    fold_of = np.full(len(table), -1)
    att_all = np.full(adata.n_obs, np.nan)
    fold_scores: list[float] = []
    with _torch_threads(n_jobs):
        if cv:
            splits = _splits(table, task, cols, groups, int(cv), random_state)
            for f, (tr, te) in enumerate(splits):
                net, mean, std = bags.fit(tr, random_state + f)
                Xte, segte, pos = bags.subset(te)
                risk, att = _predict_net(net, (Xte - mean) / std, segte, len(te))
                oof[te] = risk
                fold_of[te] = f
                att_all[tile_idx[pos]] = att
                fold_scores.append(_score(task, table.iloc[te], risk, cols))
                logger.info("Fold %d/%d: %s = %.3f", f + 1, len(splits), _metric(task), fold_scores[-1])
        net, mean, std = bags.fit(np.arange(len(table)), random_state)

    metrics: dict[str, Any] = {}
    cv_table = None
    if cv:
        metrics = _cv_metrics(task, table, oof, fold_scores, cols)
        cv_table = table.copy()
        cv_table["risk"] = oof
        cv_table["fold"] = fold_of
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
    if copy:
        return model
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


@d.dedent
def predict_outcome(  # noqa: D417 - parameters from squall_sd._docs
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
    %(table_key_data)s
    slide_key
        Column of ``obs`` naming each tile's slide (default: the model's).
    embeddings
        Key of ``obsm`` with tile embeddings (default: the model's).
    %(key_added)s
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
