"""The outcome network: gated-attention MIL, Cox loss, training loop and metrics.

torch and scikit-learn are imported inside the functions: ``import squall_sd.tl`` does not load them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from squall_sd._logging import logger

if TYPE_CHECKING:
    import torch


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


@dataclass
class _SlideBags:
    """Tiles ``X`` of the slides of ``table`` (slide ``seg[i]`` = row of ``table``), to fit on subsets."""

    X: np.ndarray
    seg: np.ndarray
    table: pd.DataFrame
    task: str
    cols: list[str]
    cfg: dict[str, Any]

    def targets(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Outcomes of the slides ``rows``: ``time`` and ``event``, or ``response``."""
        sub = self.table.iloc[rows]
        if self.task == "cox":
            return {
                "time": sub[self.cols[0]].to_numpy(float),
                "event": sub[self.cols[1]].to_numpy(float).astype(bool),
            }
        return {"response": sub[self.cols[0]].to_numpy(float)}

    def subset(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tiles of the slides ``rows``, their slide index ``0..len(rows)-1`` and their positions."""
        remap = -np.ones(len(self.table), dtype=np.int64)
        remap[rows] = np.arange(len(rows))
        m = remap[self.seg] >= 0
        return self.X[m], remap[self.seg][m], np.flatnonzero(m)

    def fit(self, rows: np.ndarray, seed: int) -> tuple[Any, np.ndarray, np.ndarray]:
        """Fit a network on the slides ``rows``; return it with the embedding mean and std."""
        Xtr, segtr, _ = self.subset(rows)
        mean, std = Xtr.mean(0), Xtr.std(0)
        std = np.where(std > 0, std, 1.0).astype(np.float32)
        net = _train((Xtr - mean) / std, segtr, self.targets(rows), task=self.task, cfg=self.cfg, seed=seed)
        return net, mean, std


def _cv_metrics(
    task: str, table: pd.DataFrame, oof: np.ndarray, fold_scores: list[float], cols: list[str]
) -> dict[str, Any]:
    """Cross-validated metric: per fold, mean, sd and pooled over the out-of-fold predictions."""
    metric = _metric(task)
    pooled = _score(task, table, oof, cols)
    metrics = {
        metric: {
            "per_fold": np.asarray(fold_scores),
            "mean": float(np.nanmean(fold_scores)),
            "sd": float(np.nanstd(fold_scores)),
            "pooled": float(pooled),
        }
    }
    logger.info(
        "Cross-validated %s: %.3f ± %.3f over %d folds (pooled out-of-fold %.3f)",
        metric,
        metrics[metric]["mean"],
        metrics[metric]["sd"],
        len(fold_scores),
        pooled,
    )
    return metrics


def _metric(task: str) -> str:
    return "c_index" if task == "cox" else "auc"
