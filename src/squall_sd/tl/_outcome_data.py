"""Inputs of the outcome models: embeddings, slide codes, per-slide outcome table and folds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from squall_sd._logging import logger


def _outcome_columns(
    task: str, *, time: str | None, event: str | None, response: str | None, pooling: str
) -> list[str]:
    """Return the outcome columns of ``task`` (``[time, event]`` or ``[response]``); check the options."""
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
    return cols


def _check_outcomes(table: pd.DataFrame, task: str, cols: list[str]) -> None:
    """Check the per-slide outcomes: 0/1 responses, or non-negative times with one event at least."""
    if task == "binary":
        vals = set(np.unique(table[cols[0]].astype(float)))
        if not vals <= {0.0, 1.0}:
            raise ValueError(f"`response` must be 0/1 (or boolean), found values {sorted(vals)[:5]}.")
    else:
        if (table[cols[0]].astype(float) < 0).any():
            raise ValueError("Survival times must be non-negative.")
        if table[cols[1]].astype(float).sum() == 0:
            raise ValueError("No event in the outcome table: the Cox model cannot be fitted.")
    if len(table) < 4:
        raise ValueError(f"Need at least 4 slides with outcomes, found {len(table)}.")


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
