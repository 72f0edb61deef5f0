"""AdamW with the published decay exemptions and a cosine schedule with linear warm-up (spec §1)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "cosine_with_warmup"]


def _scale_of(name: str, lr_scale: Mapping[str, float]) -> float:
    best, scale = -1, 1.0
    for prefix, value in lr_scale.items():
        if name.startswith(prefix) and len(prefix) > best:
            best, scale = len(prefix), float(value)
    return scale


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_scale: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split parameters into a decayed and a non-decayed group (per learning-rate multiplier).

    1-D tensors (norms, biases), names ending in ``.bias`` and names containing ``"token"`` get no
    weight decay, as in the published optimizer builder; frozen parameters are left out.

    Parameters
    ----------
    named_params
        ``(name, parameter)`` pairs, e.g. ``module.named_parameters()``.
    weight_decay
        Decay of the decayed group.
    lr_scale
        Optional learning-rate multipliers by parameter-name prefix (the longest matching prefix
        wins; 1 otherwise), stored as ``lr_scale`` in each group.

    Returns
    -------
    Parameter groups for :class:`torch.optim.AdamW`: decayed and non-decayed, for each multiplier.

    """
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "token" in name
        scale = _scale_of(name, lr_scale or {})
        buckets.setdefault((scale, no_decay), []).append(p)
    groups = []
    for (scale, no_decay), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if no_decay else float(weight_decay)}
        if lr_scale:
            group["lr_scale"] = scale
        groups.append(group)
    if not groups:
        raise ValueError("No trainable parameters.")
    return groups


def cosine_with_warmup(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    lr: float,
    warmup_start_lr: float,
    min_lr: float,
) -> float:
    """Return the learning rate at ``step``: linear warm-up, then cosine down to ``min_lr``.

    Parameters
    ----------
    step
        Optimizer step (0-based).
    total_steps
        Length of the schedule (steps).
    warmup_steps
        Warm-up steps.
    lr
        Peak learning rate.
    warmup_start_lr
        Learning rate at step 0.
    min_lr
        Final learning rate.

    Returns
    -------
    The learning rate.

    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def build_optimizer(
    module: nn.Module, optim: Mapping[str, Any], *, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``module``'s trainable parameters and its per-step cosine schedule.

    Parameters
    ----------
    module
        The module to optimise.
    optim
        The ``optim`` section of the training config.
    total_steps
        Schedule length when ``optim.total_steps`` is not set.

    Returns
    -------
    The optimizer and a :class:`~torch.optim.lr_scheduler.LambdaLR` to step every optimizer step.
    Groups with an ``optim.lr_scale`` multiplier follow the same schedule scaled by it.

    """
    lr = float(optim["lr"])
    total = int(optim.get("total_steps") or total_steps)
    warm = optim.get("warmup_steps")
    warm = int(round(total * 5 / 200)) if warm is None else int(warm)
    groups = param_groups(
        module.named_parameters(), float(optim["weight_decay"]), optim.get("lr_scale") or None
    )
    for g in groups:
        g["lr"] = lr * float(g.get("lr_scale", 1.0))
    opt = torch.optim.AdamW(
        groups,
        lr=lr,
        betas=tuple(float(b) for b in optim.get("betas", (0.9, 0.999))),
    )
    kw = {
        "total_steps": total,
        "warmup_steps": warm,
        "lr": lr,
        "warmup_start_lr": float(optim.get("warmup_start_lr", 1e-6)),
        "min_lr": float(optim.get("min_lr", 1e-6)),
    }
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, **kw) / lr)
    return opt, sched
