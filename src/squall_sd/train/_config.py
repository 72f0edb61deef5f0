"""Training configuration: defaults, YAML loading, merging and validation.

A training configuration is a nested mapping (usually a YAML file) with the sections below; every
key has a default, so a config only lists what it changes. :func:`load_config` returns the
*resolved* configuration (defaults filled in, ``auto`` values decided), which is what each run
writes beside its checkpoints.

.. code-block:: yaml

    seed: 0
    run_dir: runs/align-tiny          # checkpoints, exported models, config.yaml, metrics.json
    model:
      name: squall-tiny               # registry name, or a save_pretrained folder to start from
      overrides: {mpp: 4.0}           # SquallConfig fields for a model built from the registry
      init_from: null                 # save_pretrained folder (e.g. the phase-1 export) to load
      first
      gradient_checkpointing: false   # torch.utils.checkpoint around every transformer block
    data:
      train: shards/her2st            # a folder written by squall_sd.train.prepare (or a list)
      val: null
      batch_size: 8
      num_workers: 0
      shuffle_buffer: 512             # tiles; shuffling happens within this window
      max_tiles: null                 # use only the first N tiles (debugging / tests)
      in_memory: false                # read all shards into RAM once (small data, CPU training)
      effective_mpp: null             # e.g. 3.2: degrade tiles of slides scanned sharper than this
                                      # µm/px to it (train and val); written into the exported
                                      # model, so inference does the same; null: the starting model's
      target_smoothing_um: null       # finetune expression: e.g. 100: train on each spot's values
                                      # averaged with its neighbours' (Gaussian σ in µm); validation
                                      # stays on the measured values
      augment: {flips: true, rot90: true, stain_jitter: 0.0, color_jitter: 0.0, blur: 0.0}
    optim:
      lr: 1.0e-4
      weight_decay: 0.05              # not applied to 1-D tensors, biases and "token" parameters
      betas: [0.9, 0.999]
      warmup_steps: null              # default: 5/200 of total_steps (the published 5 of 200
      epochs)
      warmup_start_lr: 1.0e-6
      min_lr: 1.0e-6
      total_steps: null               # length of the cosine schedule; default trainer.max_steps
      lr_scale: {}                    # lr multipliers by parameter-name prefix, e.g.
                                      # {model.encoder.: 0.1} (longest matching prefix wins)
      ema_decay: null                 # e.g. 0.998: keep an exponential moving average of the
                                      # weights (Lightning's EMAWeightAveraging); validation,
                                      # checkpoints and exports then use the averaged weights
    trainer:
      max_steps: 100
      max_epochs: null
      accelerator: auto               # cpu / gpu / auto
      devices: auto
      num_nodes: 1
      strategy: auto                  # ddp / fsdp / auto
      precision: auto                 # auto: bf16-mixed on GPU, 32 on CPU
      accumulate_grad_batches: 1
      gradient_clip_val: 1.0
      log_every_n_steps: 10
      val_check_interval: null
      early_stopping: null            # stop when a validation metric stops improving, e.g.
                                      # {monitor: val/loss, patience: 5, min_delta: 0.0}
                                      # (patience counts validation runs; needs data.val; mode
                                      # defaults to max for val/pearson and accuracy, else min)
      deterministic: auto             # auto: true on CPU, "warn" on GPU
    checkpoint:
      every_n_steps: 50
      save_top_k: -1                  # keep every periodic checkpoint (-1) or only last (0)
      export: true                    # write a save_pretrained folder beside each checkpoint
      best: null                      # e.g. val/loss: also keep the checkpoint with the lowest
                                      # value as checkpoints/best.ckpt (+ its export best/)
    loss:                             # phase-specific, see the phase functions
      mask_ratio: null                # pretrain_image: share of tokens to reconstruct (default 0.5)
      rgb_weight: 1.0                 # align
      expr_weight: 1.0                # align
      contrastive_weight: 0.0         # align: Squall_contrast InfoNCE (spec §5)
      temperature: 0.1
    task:                             # finetune only
      type: expression                # expression | classification | mil
      genes: null                     # expression: gene panel (list or a text file, one per line)
      level: spot                     # expression: spot | tile
      label_key: null                 # classification: the obs column given to prepare(label_key=)
      freeze_backbone: false
      standardize: null               # expression: "section" = z-score each gene within each
                                      # section (training targets only; see ExpressionFinetuneModule)
      slide_labels: null              # mil: CSV with columns slide, and time+event or label
      outcome: survival               # mil: survival (Cox) | binary (BCE)
      hidden_dim: 256                 # mil: attention width
      dropout: 0.25
      max_tiles_per_slide: 256
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from squall_sd._sdata import staged

__all__ = ["DEFAULTS", "PHASES", "load_config", "merge_config"]

#: Phase names accepted by ``squall train <phase>``.
PHASES = ("pretrain_image", "align", "finetune")

#: Default values of every configuration key.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "run_dir": "runs/squall",
    "model": {
        "name": "squall-tiny",
        "overrides": {},
        "init_from": None,
        "gradient_checkpointing": False,
    },
    "data": {
        "train": None,
        "val": None,
        "batch_size": 8,
        "num_workers": 0,
        "shuffle_buffer": 512,
        "max_tiles": None,
        "drop_last": True,
        "in_memory": False,
        "effective_mpp": None,
        "target_smoothing_um": None,
        "augment": {"flips": True, "rot90": True, "stain_jitter": 0.0, "color_jitter": 0.0, "blur": 0.0},
    },
    "optim": {
        "lr": 1.0e-4,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "warmup_steps": None,
        "warmup_start_lr": 1.0e-6,
        "min_lr": 1.0e-6,
        "total_steps": None,
        "lr_scale": {},
        "ema_decay": None,
    },
    "trainer": {
        "max_steps": 100,
        "max_epochs": None,
        "accelerator": "auto",
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "auto",
        "accumulate_grad_batches": 1,
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
        "val_check_interval": None,
        "early_stopping": None,
        "deterministic": "auto",
        "enable_progress_bar": True,
    },
    "checkpoint": {"every_n_steps": 50, "save_top_k": -1, "export": True, "best": None},
    "loss": {
        "mask_ratio": None,
        "rgb_weight": 1.0,
        "expr_weight": 1.0,
        "contrastive_weight": 0.0,
        "temperature": 0.1,
    },
    "task": {
        "type": "expression",
        "genes": None,
        "level": "spot",
        "label_key": None,
        "freeze_backbone": False,
        "standardize": None,
        "slide_labels": None,
        "outcome": "survival",
        "hidden_dim": 256,
        "dropout": 0.25,
        "max_tiles_per_slide": 256,
    },
}

_FREE_FORM = {("model", "overrides"), ("optim", "lr_scale")}


def merge_config(
    base: Mapping[str, Any], update: Mapping[str, Any], *, _path: tuple = ()
) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``update``; unknown keys raise :class:`KeyError`.

    Parameters
    ----------
    base
        The configuration to update (not modified).
    update
        Values to set; nested mappings are merged key by key.

    Returns
    -------
    The merged configuration (a new dict).

    """
    out = copy.deepcopy(dict(base))
    for key, value in (update or {}).items():
        where = _path + (key,)
        if key not in out and _path not in _FREE_FORM and where not in _FREE_FORM:
            valid = sorted(out)
            raise KeyError(
                f"Unknown config key {'.'.join(map(str, where))!r}; valid keys here are {valid}."
            )
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            # free-form mappings (model.overrides, optim.lr_scale) are merged key by key too, without
            # checking their keys: `--set model.overrides.mpp=4` changes one override, keeping the others
            out[key] = merge_config(out[key], value, _path=where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def load_config(
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a training configuration and fill in defaults.

    Parameters
    ----------
    config
        A YAML file, a mapping, or ``None`` (defaults only).
    overrides
        Extra values, either nested or as dotted keys (``{"trainer.max_steps": 10}``), applied last.

    Returns
    -------
    The resolved configuration (a plain dict, safe to dump as YAML). Relative paths in ``data`` and
    ``run_dir`` are resolved against the YAML file's folder.

    """
    base_dir: Path | None = None
    if config is None:
        user: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        user = copy.deepcopy(dict(config))
    else:
        path = Path(config).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Training config {str(path)!r} does not exist.")
        with open(path) as fh:
            user = yaml.safe_load(fh) or {}
        if not isinstance(user, Mapping):
            raise ValueError(
                f"{str(path)!r} must hold a YAML mapping, found {type(user).__name__}."
            )
        base_dir = path.resolve().parent
    user = dict(user)
    user.pop("phase", None)
    nested: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if "." in key:
            _set_dotted(nested, key, value)
        else:
            nested[key] = value
    cfg = merge_config(DEFAULTS, user)
    cfg = merge_config(cfg, nested)

    def _resolve(p: Any) -> Any:
        if p is None or base_dir is None:
            return p
        if isinstance(p, (list, tuple)):
            return [_resolve(x) for x in p]
        q = Path(str(p)).expanduser()
        if q.is_absolute():
            return str(q)
        return str((base_dir / q).resolve())

    cfg["run_dir"] = _resolve(cfg["run_dir"])
    cfg["data"]["train"] = _resolve(cfg["data"]["train"])
    cfg["data"]["val"] = _resolve(cfg["data"]["val"])
    for key in ("slide_labels",):
        cfg["task"][key] = _resolve(cfg["task"][key])
    if isinstance(cfg["task"]["genes"], str):
        cfg["task"]["genes"] = _resolve(cfg["task"]["genes"])
    init = cfg["model"]["init_from"]
    if init is not None and base_dir is not None and not Path(str(init)).is_absolute():
        cand = base_dir / str(init)
        if cand.exists():
            cfg["model"]["init_from"] = str(cand.resolve())
    name = cfg["model"]["name"]
    if isinstance(name, str) and base_dir is not None and ("/" in name or name.startswith(".")):
        cand = base_dir / name
        if cand.exists():
            cfg["model"]["name"] = str(cand.resolve())
    _validate(cfg)
    return cfg


def _validate(cfg: Mapping[str, Any]) -> None:
    data, tr, task = cfg["data"], cfg["trainer"], cfg["task"]
    if int(data["batch_size"]) < 1:
        raise ValueError(f"data.batch_size must be >= 1, found {data['batch_size']}.")
    if tr["max_steps"] in (None, -1) and tr["max_epochs"] is None:
        raise ValueError("Set trainer.max_steps or trainer.max_epochs.")
    if task["type"] not in ("expression", "classification", "mil"):
        raise ValueError(
            f"task.type must be expression, classification or mil; found {task['type']!r}."
        )
    if task["level"] not in ("spot", "tile"):
        raise ValueError(f"task.level must be 'spot' or 'tile'; found {task['level']!r}.")
    if task.get("standardize") not in (None, "section"):
        raise ValueError(
            f"task.standardize must be null or 'section'; found {task['standardize']!r}."
        )
    if task["outcome"] not in ("survival", "binary"):
        raise ValueError(f"task.outcome must be 'survival' or 'binary'; found {task['outcome']!r}.")
    sm = data.get("target_smoothing_um")
    if sm is not None and not (isinstance(sm, (int, float)) and not isinstance(sm, bool) and float(sm) > 0):
        raise ValueError(
            f"data.target_smoothing_um must be null or a positive σ in µm (e.g. 100); found {sm!r}."
        )
    ema = cfg["optim"].get("ema_decay")
    if ema is not None and not (isinstance(ema, (int, float)) and 0.0 < float(ema) < 1.0):
        raise ValueError(
            f"optim.ema_decay must be null or a number between 0 and 1 (e.g. 0.998); found {ema!r}."
        )
    es = tr.get("early_stopping")
    if es is not None:
        if not isinstance(es, Mapping) or "monitor" not in es:
            raise ValueError(
                "trainer.early_stopping must be a mapping with at least `monitor` (e.g. "
                "{monitor: val/loss, patience: 5}); found " + repr(es) + "."
            )
        unknown = sorted(set(es) - {"monitor", "patience", "min_delta", "mode"})
        if unknown:
            raise KeyError(
                f"Unknown trainer.early_stopping key(s) {unknown}; valid: monitor, patience, min_delta, mode."
            )
    monitored = [m for m in ((es or {}).get("monitor"), cfg["checkpoint"].get("best")) if m]
    if any(str(m).startswith("val/") for m in monitored) and data["val"] is None:
        raise ValueError(
            f"{monitored} monitor(s) a validation metric but data.val is not set: give the held-out "
            "shard folders (e.g. whole sections of the training patients) as data.val."
        )


def dump_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML to ``path`` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path, mkdir=False) as tmp, open(tmp, "w") as fh:
        yaml.safe_dump(_plain(cfg), fh, sort_keys=False)
    return path


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return obj
