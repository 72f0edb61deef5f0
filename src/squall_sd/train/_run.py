"""Phase entry points (pretrain_image, align, finetune), Trainer and checkpoint export."""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, WeightAveraging

from squall_sd._logging import logger
from squall_sd._sdata import staged
from squall_sd.train._config import dump_config, load_config
from squall_sd.train._data import ShardDataModule
from squall_sd.train._mil import _MILDataModule
from squall_sd.train._modules import (
    AlignModule,
    ClassificationFinetuneModule,
    ExpressionFinetuneModule,
    ImagePretrainModule,
    MILModule,
    SquallModule,
)
from squall_sd.train._shards import read_manifest

__all__ = ["TrainResult", "pretrain_image", "align", "finetune", "run_phase", "ExportCheckpoint"]

CKPT_DIR = "checkpoints"
LAST = "last.ckpt"


@dataclass
class TrainResult:
    """What a training phase produced.

    Attributes
    ----------
    run_dir
        The run folder (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``).
    last_checkpoint
        The Lightning checkpoint to resume from (``checkpoints/last.ckpt``).
    model_dir
        The ``save_pretrained`` export of the last checkpoint (``checkpoints/last/``); load it with
        :func:`squall_sd.models.load`.
    metrics
        Final logged metrics (floats).
    history
        Per-step training losses ``[{"step": ..., "loss": ...}, ...]`` of this call.
    module
        The trained LightningModule (its ``model`` attribute is the Squall model).

    """

    run_dir: Path
    last_checkpoint: Path
    model_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    module: Any = None


# ------------------------------------------------------------------------------------ provenance
def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError):
            continue
    return out


def _provenance(trainer: pl.Trainer, module: SquallModule) -> dict[str, Any]:
    from squall_sd import __version__

    return {
        "squall_sd_version": __version__,
        "git_sha": _git_sha(),
        "phase": module.phase,
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
        "batches_seen": int(module.batches_seen),
        "torch_version": torch.__version__,
        "lightning_version": pl.__version__,
        "world_size": int(trainer.world_size),
        "precision": str(trainer.precision),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_beside(directory: Path, trainer: pl.Trainer, module: SquallModule) -> None:
    dump_config(module.cfg, directory / "config.yaml")
    (directory / "provenance.json").write_text(
        json.dumps(_provenance(trainer, module), indent=2) + "\n"
    )
    metrics = {**_plain_metrics(trainer.callback_metrics), "global_step": int(trainer.global_step)}
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


class ExportCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also exports each saved checkpoint as a ``save_pretrained`` folder.

    Beside ``checkpoints/<name>.ckpt`` it writes ``checkpoints/<name>/`` with ``config.json``,
    ``model.safetensors`` and ``genes.txt`` (loadable with :func:`squall_sd.models.load`), any
    task head (``head.safetensors`` + ``head.json``), the resolved training ``config.yaml``,
    ``provenance.json`` (package version, git SHA, step) and ``metrics.json``. The final state of a
    run is always saved as ``last.ckpt`` / ``last/``, also when ``max_steps`` is not a multiple of
    the checkpoint interval.

    Parameters
    ----------
    export
        Write the exported folders (rank 0 only).
    **kwargs
        Passed to :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.

    """

    def __init__(self, *, export: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.export = export
        self._last_step_saved = -1

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_step_saved = trainer.global_step
        if not trainer.is_global_zero:
            return
        module = trainer.lightning_module
        if self.export:
            with staged(Path(filepath).with_suffix(""), mkdir=False) as tmp:
                # with optim.ema_decay the checkpoint holds the averaged weights: export those too
                (_averaged_module(trainer) or module).export(tmp)
                _write_beside(tmp, trainer, module)
        _write_beside(Path(filepath).parent, trainer, module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save ``last.ckpt`` for the final step if the periodic saves missed it."""
        if trainer.global_step != self._last_step_saved and trainer.global_step > 0:
            monitor_candidates = self._monitor_candidates(trainer)
            self._save_last_checkpoint(trainer, monitor_candidates)


def _averaged_module(trainer: pl.Trainer) -> SquallModule | None:
    """Return the weight-averaged copy of the module kept by a WeightAveraging callback (EMA), if any."""
    for cb in trainer.callbacks:
        if isinstance(cb, WeightAveraging):
            # Lightning keeps the AveragedModel privately; it writes the same weights into every
            # checkpoint's state_dict (tests/train/test_recipe_options.py checks the two agree)
            averaged = getattr(cb, "_average_model", None)
            return None if averaged is None else averaged.module
    return None


class _History(Callback):
    """Append per-step losses to ``run_dir/metrics.jsonl`` (rank 0) and keep them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if not trainer.is_global_zero:
            return
        row = {"step": int(trainer.global_step), "batches_seen": int(pl_module.batches_seen)}
        row.update(
            {
                k[6:]: v
                for k, v in _plain_metrics(trainer.callback_metrics).items()
                if k.startswith("train/")
            }
        )
        if isinstance(outputs, Mapping) and "loss" in outputs:
            row["loss"] = float(outputs["loss"].detach())
        elif isinstance(outputs, torch.Tensor):
            row["loss"] = float(outputs.detach())
        self.history.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ building
def _resolve_trainer_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    t = dict(cfg["trainer"])
    acc = t["accelerator"]
    gpu = torch.cuda.is_available() and acc in ("auto", "gpu", "cuda")
    if t["precision"] in (None, "auto"):
        t["precision"] = "bf16-mixed" if gpu else "32-true"
    if t["deterministic"] in (None, "auto"):
        t["deterministic"] = "warn" if gpu else True
    if t["devices"] in (None, "auto"):
        t["devices"] = "auto" if gpu else 1
    return t


def _build_model(cfg: Mapping[str, Any], genes: list[str] | None) -> Any:
    from squall_sd import models

    mc = cfg["model"]
    if mc.get("init_from"):
        model = models.load(mc["init_from"])
        logger.info("initialised from %s", mc["init_from"])
    elif isinstance(mc["name"], str) and Path(mc["name"]).expanduser().is_dir():
        model = models.load(mc["name"])
    else:
        overrides = dict(mc.get("overrides") or {})
        base = models.get_config(mc["name"])
        if base.genes is None and "genes" not in overrides and genes is not None:
            overrides["genes"] = list(genes)
        model = models.create(mc["name"], **overrides)
    model.train()
    if genes is not None:
        if model.genes is None:
            if len(genes) != model.n_genes:
                raise ValueError(
                    f"The prepared data have {len(genes)} genes but the model has "
                    f"{model.n_genes} channels."
                )
            model.set_vocabulary(list(genes))
        elif list(model.genes) != list(genes):
            raise ValueError(
                "The prepared data were made for a different gene vocabulary than the model's. Run "
                "`squall prepare` with this model (model_config_or_name=<the model or its folder>)."
            )
    _settle_effective_mpp(cfg, model)
    return model


def _settle_effective_mpp(cfg: Any, model: Any) -> None:
    """Give the run's tiles and the exported model one optical resolution.

    ``data.effective_mpp``, when set, is written into the model's config (so inference degrades sharper
    images the same way); unset, the run inherits the starting model's (a model trained on soft tiles
    stays soft).
    """
    eff = cfg["data"].get("effective_mpp")
    if eff is None:
        cfg["data"]["effective_mpp"] = model.config.effective_mpp
    elif model.config.effective_mpp != float(eff):
        if model.config.effective_mpp is not None:
            logger.warning(
                "data.effective_mpp=%g replaces the starting model's effective_mpp=%g",
                float(eff), model.config.effective_mpp,
            )
        model.config = model.config.replace(effective_mpp=float(eff))


def monitor_mode(metric: str) -> str:
    """``"max"`` for metrics where higher is better (accuracy, Pearson r), else ``"min"`` (losses)."""
    return "max" if any(k in metric for k in ("acc", "pearson")) else "min"


def _build_trainer(
    cfg: Mapping[str, Any], run_dir: Path, extra: list[Callback]
) -> tuple[pl.Trainer, ExportCheckpoint, _History]:
    from lightning.pytorch.loggers import CSVLogger

    t = _resolve_trainer_kwargs(cfg)
    ck = cfg["checkpoint"]
    every = ck.get("every_n_steps") or None
    ckpt_cb = ExportCheckpoint(
        export=bool(ck.get("export", True)),
        dirpath=run_dir / CKPT_DIR,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_top_k=int(ck.get("save_top_k", -1)) if every else 0,
        save_last=True,
    )
    extra = list(extra)
    if ck.get("best"):
        # the checkpoint with the best monitored value, exported like the others (best.ckpt / best/)
        extra.append(
            ExportCheckpoint(
                export=bool(ck.get("export", True)),
                dirpath=run_dir / CKPT_DIR,
                filename="best",
                auto_insert_metric_name=False,
                monitor=str(ck["best"]),
                mode=monitor_mode(str(ck["best"])),
                save_top_k=1,
                save_last=False,
                enable_version_counter=False,
            )
        )
    ema = cfg["optim"].get("ema_decay")
    if ema is not None:
        extra.append(EMAWeightAveraging(decay=float(ema)))
    es = t.get("early_stopping")
    if es:
        from lightning.pytorch.callbacks import EarlyStopping

        extra.append(
            EarlyStopping(
                monitor=str(es["monitor"]),
                patience=int(es.get("patience", 3)),
                min_delta=float(es.get("min_delta", 0.0)),
                mode=str(es.get("mode") or monitor_mode(str(es["monitor"]))),
                check_on_train_epoch_end=False,
                verbose=False,
            )
        )
    hist = _History(run_dir / "metrics.jsonl")
    kwargs: dict[str, Any] = {
        "accelerator": t["accelerator"],
        "devices": t["devices"],
        "num_nodes": int(t["num_nodes"]),
        "strategy": t["strategy"],
        "precision": t["precision"],
        "accumulate_grad_batches": int(t["accumulate_grad_batches"]),
        "gradient_clip_val": t["gradient_clip_val"],
        "log_every_n_steps": int(t["log_every_n_steps"]),
        "deterministic": t["deterministic"],
        "default_root_dir": str(run_dir),
        "callbacks": [ckpt_cb, hist, *extra],
        "logger": CSVLogger(str(run_dir), name="logs"),
        "enable_progress_bar": bool(t.get("enable_progress_bar", True)),
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    if t["max_steps"] not in (None, -1):
        kwargs["max_steps"] = int(t["max_steps"])
        kwargs["max_epochs"] = -1 if t["max_epochs"] is None else int(t["max_epochs"])
    else:
        kwargs["max_epochs"] = int(t["max_epochs"])
    if cfg["data"].get("val") is None:
        kwargs["limit_val_batches"] = 0
    if t.get("val_check_interval") is not None:
        kwargs["val_check_interval"] = t["val_check_interval"]
        kwargs["check_val_every_n_epoch"] = None
    return pl.Trainer(**kwargs), ckpt_cb, hist


def _resume_path(run_dir: Path, resume: bool | str | os.PathLike | None) -> str | None:
    last = run_dir / CKPT_DIR / LAST
    if resume in (None, "auto", True):
        if last.is_file():
            logger.info("resuming from %s", last)
            return str(last)
        if resume is True:
            raise FileNotFoundError(f"--resume given but {last} does not exist.")
        return None
    if resume is False:
        return None
    p = Path(resume)
    if p.is_dir():
        p = p / CKPT_DIR / LAST if (p / CKPT_DIR / LAST).is_file() else p / LAST
    if not p.is_file():
        raise FileNotFoundError(f"Checkpoint {str(p)!r} to resume from does not exist.")
    return str(p)


def _fit(
    module: SquallModule,
    cfg: Mapping[str, Any],
    datamodule: pl.LightningDataModule,
    resume: Any,
) -> TrainResult:
    run_dir = Path(cfg["run_dir"]).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = _resume_path(run_dir, resume)
    if ckpt is None and (run_dir / CKPT_DIR / LAST).exists():
        logger.warning(
            "starting from scratch although %s exists (resume disabled)", run_dir / CKPT_DIR / LAST
        )
    trainer, ckpt_cb, hist = _build_trainer(cfg, run_dir, [])
    if trainer.is_global_zero:
        dump_config(cfg, run_dir / "config.yaml")
    with warnings.catch_warnings():
        # the shard stream resumes exactly (it skips the batches already seen, see ShardDataset),
        # and
        # it deals whole batches to workers, so these two Lightning warnings do not apply
        warnings.filterwarnings(
            "ignore", message=".*resuming from a checkpoint that ended before the epoch"
        )
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    last = run_dir / CKPT_DIR / LAST
    metrics = _plain_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(
            json.dumps({**metrics, "global_step": trainer.global_step}, indent=2)
        )
    return TrainResult(run_dir, last, last.with_suffix(""), metrics, hist.history, module)


def _seed(cfg: Mapping[str, Any]) -> None:
    pl.seed_everything(int(cfg["seed"]), workers=True, verbose=False)


def _only_for_expression(cfg: Mapping[str, Any], phase: str) -> None:
    """Refuse ``data.target_smoothing_um`` outside expression fine-tuning (it changes log1p targets)."""
    if cfg["data"].get("target_smoothing_um") is not None:
        raise ValueError(
            f"data.target_smoothing_um smooths spot expression targets, which {phase} does not regress; "
            "set it only for `squall train finetune` with task.type: expression (or set it to null)."
        )


def _data_genes(cfg: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    src = cfg["data"]["train"]
    if src is None:
        raise ValueError("data.train is not set: give the folder written by `squall prepare`.")
    first = src[0] if isinstance(src, (list, tuple)) else src
    man = read_manifest(first)
    return list(man["genes"]), man


# ------------------------------------------------------------------------------------ phases
def pretrain_image(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    resume: Any = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Phase 1: self-supervised image pretraining on H&E tiles alone.

    Masked-token RGB reconstruction through the published RGB decoder path (see
    :func:`squall_sd.train.masked_image_loss`); expression in the shards is ignored, so H&E-only
    slides can be used.

    Parameters
    ----------
    config
        A YAML file or mapping (see :mod:`squall_sd.train`); ``loss.mask_ratio`` sets the share of
        hidden tokens.
    resume
        ``"auto"`` (default): continue from ``run_dir/checkpoints/last.ckpt`` when it exists;
        ``True``: require it; ``False``: start over; or a checkpoint path.
    overrides
        Config values to change, e.g. ``{"trainer.max_steps": 10}``.

    Returns
    -------
    A :class:`TrainResult`.

    """
    cfg = load_config(config, overrides)
    _only_for_expression(cfg, "pretrain_image")
    _seed(cfg)
    genes, _ = _data_genes(cfg)
    model = _build_model(cfg, genes)
    return _fit(ImagePretrainModule(model, cfg), cfg, ShardDataModule(cfg), resume)


def align(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    resume: Any = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Phase 2: the published complementary-masked reconstruction + optional InfoNCE.

    Parameters
    ----------
    config
        A YAML file or mapping; ``loss.rgb_weight``, ``loss.expr_weight``,
        ``loss.contrastive_weight`` and ``loss.temperature`` set the objective; ``model.init_from``
        usually points at the phase-1 export.
    resume
        See :func:`pretrain_image`.
    overrides
        Config values to change.

    Returns
    -------
    A :class:`TrainResult`.

    """
    cfg = load_config(config, overrides)
    _only_for_expression(cfg, "align")
    _seed(cfg)
    genes, _ = _data_genes(cfg)
    model = _build_model(cfg, genes)
    return _fit(AlignModule(model, cfg), cfg, ShardDataModule(cfg), resume)


def _panel(task: Mapping[str, Any], model: Any) -> list[str]:
    genes = task.get("genes")
    if genes is None:
        return list(model.genes)
    if isinstance(genes, str):
        p = Path(genes)
        if not p.is_file():
            raise FileNotFoundError(f"task.genes file {genes!r} does not exist.")
        genes = [g.strip() for g in p.read_text().splitlines() if g.strip()]
    vocab = set(model.genes)
    missing = [g for g in genes if g not in vocab]
    if missing:
        raise KeyError(
            f"{len(missing)} panel genes are not in the model vocabulary, e.g. {missing[:5]}."
        )
    return list(genes)


def finetune(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    resume: Any = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Phase 3: fine-tune a head (``task.type``): expression, tile classes or slide MIL.

    - ``expression``: spot-level (or tile-level) regression of log1p(CP10k) for ``task.genes``,
      see :class:`~squall_sd.train.ExpressionFinetuneModule`;
    - ``classification``: tile classes from ``prepare(label_key=...)``, cross-entropy;
    - ``mil``: slide outcome from frozen tile embeddings (mean ``forward_rgb`` tokens) with
      gated-attention MIL; ``task.slide_labels`` is a CSV with a ``slide`` column (the slide ids of
      the manifest) and ``time`` + ``event`` (``outcome: survival``, Cox) or ``label`` (``binary``,
      BCE). Every step sees all slides (full-batch Cox risk sets).

    Parameters
    ----------
    config
        A YAML file or mapping.
    resume
        See :func:`pretrain_image`.
    overrides
        Config values to change.

    Returns
    -------
    A :class:`TrainResult`.

    """
    cfg = load_config(config, overrides)
    _seed(cfg)
    genes, man = _data_genes(cfg)
    model = _build_model(cfg, genes)
    task = cfg["task"]
    if task["type"] != "expression":
        _only_for_expression(cfg, f"finetune with task.type: {task['type']}")
    if task["type"] == "expression":
        module: SquallModule = ExpressionFinetuneModule(model, cfg, _panel(task, model))
        return _fit(module, cfg, ShardDataModule(cfg), resume)
    if task["type"] == "classification":
        classes = (man.get("labels") or {}).get("categories")
        if not classes:
            raise ValueError(
                "The prepared data have no tile labels; run "
                "`prepare(..., label_key=<obs column>)` first."
            )
        return _fit(
            ClassificationFinetuneModule(model, cfg, classes), cfg, ShardDataModule(cfg), resume
        )
    return _fit(MILModule(model, cfg), cfg, _MILDataModule(cfg, model), resume)


def run_phase(
    phase: str,
    config: str | os.PathLike | Mapping[str, Any],
    *,
    resume: Any = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Run ``phase`` (``pretrain_image``, ``align`` or ``finetune``) with ``config``.

    Parameters
    ----------
    phase
        Phase name (``pretrain``/``image`` and ``alignment`` are accepted aliases).
    config
        A YAML file or mapping.
    resume
        See :func:`pretrain_image`.
    overrides
        Config values to change.

    Returns
    -------
    A :class:`TrainResult`.

    """
    aliases = {
        "pretrain": "pretrain_image",
        "image": "pretrain_image",
        "alignment": "align",
        "fine-tune": "finetune",
    }
    phase = aliases.get(phase, phase)
    fns = {"pretrain_image": pretrain_image, "align": align, "finetune": finetune}
    if phase not in fns:
        raise ValueError(f"Unknown phase {phase!r}; choose one of {sorted(fns)}.")
    return fns[phase](config, resume=resume, overrides=overrides)
