"""LightningModules of the three training phases."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from squall_sd._logging import logger
from squall_sd.train._data import expression_grid, section_stats, spot_matrix
from squall_sd.train._losses import (
    GatedAttentionMIL,
    cox_partial_likelihood,
    info_nce,
    masked_image_loss,
)
from squall_sd.train._optim import build_optimizer

__all__ = [
    "SquallModule",
    "ImagePretrainModule",
    "AlignModule",
    "ExpressionFinetuneModule",
    "ClassificationFinetuneModule",
    "MILModule",
    "enable_gradient_checkpointing",
]


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block in the backward pass (gradient checkpointing).

    Wraps the ``forward`` of each child of every ``blocks`` :class:`~torch.nn.ModuleList` (the
    encoder's MultiWay blocks and the decoder blocks); active only in training mode with gradients
    enabled. Trades about one extra forward pass for activation memory that no longer grows with
    depth.

    Parameters
    ----------
    model
        The model.

    Returns
    -------
    The number of wrapped blocks.

    """
    from torch.utils.checkpoint import checkpoint

    n = 0
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "blocks"):
            continue
        for blk in mod:
            if getattr(blk, "_squall_checkpointed", False):
                continue
            orig = blk.forward

            def fwd(*args: Any, _orig=orig, _blk=blk, **kwargs: Any) -> Any:
                if _blk.training and torch.is_grad_enabled():
                    return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                return _orig(*args, **kwargs)

            blk.forward = fwd
            blk._squall_checkpointed = True
            n += 1
    logger.info("gradient checkpointing on %d blocks", n)
    return n


def section_pearson(pred: torch.Tensor, target: torch.Tensor, slide: torch.Tensor) -> torch.Tensor | None:
    """Mean per-gene Pearson r within each section, averaged over genes, then over sections.

    ``pred`` and ``target`` are (spots, genes), ``slide`` (spots,) the section of each spot. Sections
    with fewer than 3 spots and genes whose measured values do not vary within a section are left out.
    A gene whose prediction does not vary within a section counts as r = 0 (no skill), so a model that
    collapses to a constant output scores 0 rather than dropping out of the metric. ``None`` when no
    section has a gene to score.
    """
    per = per_section_pearson(pred, target, slide)
    return torch.stack(list(per.values())).mean() if per else None


def per_section_pearson(pred: torch.Tensor, target: torch.Tensor, slide: torch.Tensor) -> dict[int, torch.Tensor]:
    """Section index -> its mean per-gene Pearson r (the terms :func:`section_pearson` averages)."""
    pred, target = pred.double(), target.double()
    rs = {}
    for sl in torch.unique(slide):
        at = slide == sl
        if int(at.sum()) < 3:
            continue
        p = pred[at] - pred[at].mean(0)
        t = target[at] - target[at].mean(0)
        r = (p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0)).clamp_min(1e-12)
        ok = t.norm(dim=0) > 0
        if ok.any():
            rs[int(sl)] = r[ok].mean()
    return rs


class SquallModule(pl.LightningModule):
    """Base class: optimizer, per-step seeding, data position, logging and export.

    Parameters
    ----------
    model
        The :class:`~squall_sd.models.Squall` being trained.
    cfg
        Resolved training configuration.

    """

    phase = "base"

    def __init__(self, model: nn.Module, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.cfg = dict(cfg)
        #: training batches consumed so far (drives the data order and the per-step seed).
        self.batches_seen = 0
        if cfg["model"].get("gradient_checkpointing"):
            enable_gradient_checkpointing(self.model)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on 1-D / bias / token parameters) with per-step cosine + warm-up."""
        total = self.cfg["optim"].get("total_steps")
        if not total:
            ms = self.trainer.max_steps
            total = ms if ms and ms > 0 else int(self.trainer.estimated_stepping_batches)
        opt, sched = build_optimizer(self, self.cfg["optim"], total_steps=int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _seed_step(self) -> None:
        seed = int(self.cfg["seed"])
        value = (seed * 1_000_003 + self.batches_seen * 7_919 + self.global_rank * 104_729) % (
            2**62
        )
        torch.manual_seed(value)

    def _sync_data(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "sync_position"):
            dm.sync_position(self.batches_seen)

    def on_train_epoch_start(self) -> None:
        """Point the data stream at the next unseen batch."""
        self._sync_data()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the data position."""
        checkpoint["squall_batches_seen"] = int(self.batches_seen)
        checkpoint["squall_phase"] = self.phase

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the data position."""
        self.batches_seen = int(checkpoint.get("squall_batches_seen", 0))

    # ------------------------------------------------------------------ steps
    def losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return a dict of losses with the total under ``"loss"``."""
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One training step (seeded by the number of batches seen)."""
        self._seed_step()
        self.batches_seen += 1
        out = self.losses(batch)
        bs = int(batch["rgb"].shape[0]) if "rgb" in batch else None
        for k, v in out.items():
            self.log(
                f"train/{k}",
                v.detach(),
                on_step=True,
                on_epoch=False,
                prog_bar=k == "loss",
                batch_size=bs,
            )
        return out["loss"]

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Log validation losses (masks drawn with a fixed seed per batch)."""
        gen_state = torch.get_rng_state()
        torch.manual_seed(int(self.cfg["seed"]) + batch_idx)
        out = self.losses(batch)
        torch.set_rng_state(gen_state)
        bs = int(batch["rgb"].shape[0]) if "rgb" in batch else None
        for k, v in out.items():
            self.log(
                f"val/{k}", v.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=bs
            )

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path) -> Path:
        """Write the model in ``save_pretrained`` format (plus any head) to ``directory``."""
        directory = Path(directory)
        self.model.save_pretrained(directory, overwrite=True)
        self._export_head(directory)
        return directory

    def _export_head(self, directory: Path) -> None:
        return None

    def _save_head(self, directory: Path, head: nn.Module, meta: Mapping[str, Any]) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(directory / "head.safetensors"))
        (directory / "head.json").write_text(
            json.dumps({"phase": self.phase, **meta}, indent=2) + "\n"
        )


class ImagePretrainModule(SquallModule):
    """Phase 1: self-supervised image pretraining by masked-token RGB reconstruction.

    See :func:`squall_sd.train.masked_image_loss`: hidden positions carry the empty-expression
    token, the published RGB decoder path reconstructs their pixels. ``loss.mask_ratio`` (default
    the model's ``mask_ratio``, 0.5) is the share of hidden positions.
    """

    phase = "pretrain_image"

    def losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: D102
        ratio = self.cfg["loss"].get("mask_ratio") or float(self.model.config.mask_ratio)
        loss = masked_image_loss(self.model, batch["rgb"], batch["res"], mask_ratio=float(ratio))
        return {"loss": loss, "rgb_loss": loss.detach()}


class AlignModule(SquallModule):
    """Phase 2: the published complementary-masked reconstruction, plus optional InfoNCE.

    ``loss = rgb_weight * rgb_loss + expr_weight * expr_loss + contrastive_weight * InfoNCE`` with
    the two SmoothL1 losses of :meth:`Squall.forward <squall_sd.models.Squall.forward>` and the
    token-level InfoNCE of :func:`squall_sd.train.info_nce` (τ = ``loss.temperature``) between
    ``forward_rgb`` and ``forward_expr`` encodings.
    """

    phase = "align"

    def losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: D102
        lc = self.cfg["loss"]
        expr = expression_grid(batch, self.model.n_genes)
        rgb_loss, expr_loss = self.model(batch["rgb"], expr, batch["res"])
        loss = float(lc["rgb_weight"]) * rgb_loss + float(lc["expr_weight"]) * expr_loss
        out = {"rgb_loss": rgb_loss.detach(), "expr_loss": expr_loss.detach()}
        w = float(lc.get("contrastive_weight") or 0.0)
        if w > 0:
            z_rgb = self.model.forward_rgb(batch["rgb"], batch["res"])
            z_expr = self.model.forward_expr(expr, batch["res"])
            nce = info_nce(z_rgb, z_expr, float(lc["temperature"]))
            loss = loss + w * nce
            out["contrastive_loss"] = nce.detach()
        out["loss"] = loss
        return out


class _FinetuneBase(SquallModule):
    phase = "finetune"

    def __init__(self, model: nn.Module, cfg: Mapping[str, Any]) -> None:
        super().__init__(model, cfg)
        if cfg["task"].get("freeze_backbone"):
            self.model.requires_grad_(False)


class ExpressionFinetuneModule(_FinetuneBase):
    """Phase 3, expression regression for a gene panel (log1p CP10k, MSE).

    The predicted grid is aggregated over each spot's disc (``task.level: spot``; mean over the
    spot's cells, done on the pre-``fc2`` features, which is exact because ``fc2`` is linear) or
    over
    all spot cells of the tile (``tile``; the target is then the cell-weighted mean of the spots),
    mapped through a per-gene affine calibration (``head.scale``, ``head.shift``; the backbone
    predicts in the binary pretraining space) and regressed on log1p(CP10k) with MSE.

    With ``task.standardize: section`` the targets are z-scored per gene within each section
    (mean and standard deviation over the section's spots, the deviation floored at 0.1), which
    removes section- and patient-level offsets and scales that a per-section correlation ignores
    anyway; the exported head maps back to log1p(CP10k) with the average section mean and
    deviation of the training data (``scale' = scale * sd``, ``shift' = shift * sd + mean``).

    Parameters
    ----------
    model
        The model.
    cfg
        Resolved configuration.
    genes
        The panel (symbols in the model vocabulary).

    """

    def __init__(self, model: nn.Module, cfg: Mapping[str, Any], genes: Sequence[str]) -> None:
        super().__init__(model, cfg)
        self.genes = list(genes)
        idx = model.gene_index(self.genes)
        self.register_buffer("gene_idx", torch.as_tensor(idx, dtype=torch.long), persistent=False)
        self.head = nn.ParameterDict(
            {
                "scale": nn.Parameter(torch.ones(len(idx))),
                "shift": nn.Parameter(torch.zeros(len(idx))),
            }
        )
        self.level = cfg["task"]["level"]
        self.standardize = cfg["task"].get("standardize")
        if self.standardize == "section":
            for split in ("train", "val"):
                src = cfg["data"].get(split)
                if src is None:
                    continue
                mean, std = section_stats(src, idx)
                std = np.maximum(std, 0.1)
                self.register_buffer(f"{split}_mean", torch.from_numpy(mean), persistent=False)
                self.register_buffer(f"{split}_std", torch.from_numpy(std), persistent=False)
                if split == "train":
                    self.register_buffer(
                        "ref_mean", torch.from_numpy(mean.mean(0)), persistent=False
                    )
                    self.register_buffer("ref_std", torch.from_numpy(std.mean(0)), persistent=False)
            logger.info("expression targets z-scored per section (%d sections)", len(self.train_mean))

    def _standardize(self, target: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.standardize != "section":
            return target
        split = "train" if self.training or not hasattr(self, "val_mean") else "val"
        mean, std = getattr(self, f"{split}_mean"), getattr(self, f"{split}_std")
        slide = batch["slide"][batch["spot_tile"]]
        return (target - mean[slide]) / std[slide]

    def predict_regions(
        self, batch: Mapping[str, torch.Tensor], *, return_slide: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Predictions and targets (R, P) per spot (or per tile) of a batch (and each one's slide)."""
        m = self.model
        z = m.forward_rgb(batch["rgb"], batch["res"])
        h = m.decoder.expression_features(z).float()  # (B, g, g, E)
        cs = batch["cell_spot"]
        valid = cs >= 0
        if "cell_fill" in batch:  # filled cells lie outside their spot: not part of it
            valid = valid & ~batch["cell_fill"]
        n_sp = batch["spot_crow"].numel() - 1
        fc2 = m.decoder.increase_dim_rgb.fc2
        w, b = fc2.weight[self.gene_idx].float(), fc2.bias[self.gene_idx].float()
        target_all = spot_matrix(batch, m.n_genes, binary=False)[:, self.gene_idx]
        target_all = self._standardize(target_all, batch)
        counts = torch.bincount(cs[valid], minlength=n_sp).float()
        if self.level == "spot":
            feats = torch.zeros(n_sp, h.shape[-1], device=h.device).index_add_(
                0, cs[valid], h[valid]
            )
            keep = counts > 0
            feats = feats[keep] / counts[keep, None]
            target = target_all[keep]
            slide = batch["slide"][batch["spot_tile"]][keep]
        else:
            bsz = cs.shape[0]
            tile_of_cell = torch.arange(bsz, device=h.device)[:, None, None].expand_as(cs)
            ncell = torch.bincount(tile_of_cell[valid], minlength=bsz).float()
            feats = torch.zeros(bsz, h.shape[-1], device=h.device).index_add_(
                0, tile_of_cell[valid], h[valid]
            )
            tiles = batch["spot_tile"]
            tgt = torch.zeros(bsz, target_all.shape[1], device=h.device).index_add_(
                0, tiles, target_all * counts[:, None]
            )
            keep = ncell > 0
            feats = feats[keep] / ncell[keep, None]
            target = tgt[keep] / ncell[keep, None]
            slide = batch["slide"][keep]
        pred = F.linear(feats, w, b) * self.head["scale"] + self.head["shift"]
        return (pred, target, slide) if return_slide else (pred, target)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Log the validation loss and keep the predictions for :meth:`on_validation_epoch_end`."""
        super().validation_step(batch, batch_idx)
        pred, target, slide = self.predict_regions(batch, return_slide=True)
        self._val_outputs.append((pred.detach().float().cpu(), target.detach().float().cpu(), slide.cpu()))

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []

    def on_validation_epoch_end(self) -> None:
        """Log ``val/pearson``, the mean per-gene Pearson r within the validation sections.

        Per section, r over its spots for each gene, averaged over genes, then over sections: the
        metric of the her2st benchmark, on validation data (:func:`section_pearson`). With several
        validation sections each one's r is also logged as ``val/pearson/<slide id>`` (one process;
        usable as ``trainer.early_stopping.monitor`` or ``checkpoint.best``, e.g. to stop on one section
        and watch the others).
        """
        outs = getattr(self, "_val_outputs", [])
        if not outs:
            return
        per = per_section_pearson(
            torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs])
        )
        self._val_outputs = []
        if not per:
            return
        value = torch.stack(list(per.values())).mean()
        self.log("val/pearson", value.float().to(self.device), on_step=False, on_epoch=True, sync_dist=True)
        # one curve per validation section, val/pearson/<slide id> (e.g. val/pearson/C6), on one process:
        # under DDP each rank holds other sections, and metrics logged by some ranks only cannot be synced
        if len(per) > 1 and self.trainer.world_size == 1:
            ids = self._val_slide_ids()
            for sl, r in per.items():
                name = ids[sl] if sl < len(ids) else str(sl)
                self.log(f"val/pearson/{name}", r.float().to(self.device), on_step=False, on_epoch=True)

    def _val_slide_ids(self) -> list[str]:
        """Slide ids of the validation data, in the order of its ``slide`` field (empty if unknown)."""
        ds = getattr(self.trainer.datamodule, "val_ds", None)
        return [str(s.get("id", k)) for k, s in enumerate(ds.slides)] if ds is not None else []

    def losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: D102
        pred, target = self.predict_regions(batch)
        if pred.shape[0] == 0:
            loss = self.head["scale"].sum() * 0.0
        else:
            loss = F.mse_loss(pred, target)
        return {"loss": loss, "mse": loss.detach()}

    def _export_head(self, directory: Path) -> None:
        head: nn.Module = self.head
        meta: dict[str, Any] = {
            "task": "expression",
            "level": self.level,
            "genes": self.genes,
            "target": "log1p_cp10k",
            "region_reduce": "mean",  # the head is fitted on the mean of a region's cell outputs
        }
        if self.standardize == "section":
            # fold the average section mean / deviation in: outputs are log1p(CP10k) again
            sd, mu = self.ref_std.detach(), self.ref_mean.detach()
            head = nn.ParameterDict(
                {
                    "scale": nn.Parameter(self.head["scale"].detach() * sd),
                    "shift": nn.Parameter(self.head["shift"].detach() * sd + mu),
                }
            )
            meta["standardize"] = "section (folded: average training-section mean and sd)"
        self._save_head(directory, head, meta)


class ClassificationFinetuneModule(_FinetuneBase):
    """Phase 3, tile classification: mean-pooled ``forward_rgb`` tokens → Linear → cross-entropy.

    Tiles with label -1 (no class) are ignored.

    Parameters
    ----------
    model
        The model.
    cfg
        Resolved configuration.
    classes
        Class names (the label codes index this list).

    """

    def __init__(self, model: nn.Module, cfg: Mapping[str, Any], classes: Sequence[str]) -> None:
        super().__init__(model, cfg)
        self.classes = list(classes)
        self.head = nn.Linear(model.config.embed_dim, len(self.classes))
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class logits (B, C)."""
        z = self.model.forward_rgb(batch["rgb"], batch["res"])
        return self.head(z.mean(dim=1).float())

    def losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: D102
        logits = self.logits(batch)
        y = batch["label"]
        if not (y >= 0).any():
            loss = logits.sum() * 0.0
            acc = torch.zeros((), device=logits.device)
        else:
            loss = F.cross_entropy(logits, y, ignore_index=-1)
            keep = y >= 0
            acc = (logits[keep].argmax(-1) == y[keep]).float().mean()
        return {"loss": loss, "accuracy": acc.detach()}

    def _export_head(self, directory: Path) -> None:
        self._save_head(directory, self.head, {"task": "classification", "classes": self.classes})


class MILModule(SquallModule):
    """Phase 3, slide-level outcome from frozen tile embeddings with gated-attention MIL.

    ``task.outcome: survival`` trains a Cox risk with the negative partial likelihood (batch risk
    sets, Breslow ties; ``event`` = 1 where observed); ``binary`` trains a logit with BCE. The
    backbone is frozen and not part of the optimisation; the exported folder holds the backbone
    unchanged plus ``head.safetensors`` (the aggregator).

    Parameters
    ----------
    model
        The (frozen) model.
    cfg
        Resolved configuration.

    """

    phase = "finetune"

    def __init__(self, model: nn.Module, cfg: Mapping[str, Any]) -> None:
        super().__init__(model, cfg)
        self.model.requires_grad_(False)
        t = cfg["task"]
        self.outcome = t["outcome"]
        self.head = GatedAttentionMIL(
            model.config.embed_dim, int(t["hidden_dim"]), 1, float(t["dropout"])
        )

    def losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: D102
        out, _ = self.head(batch["x"], batch["mask"])
        out = out.squeeze(-1)
        if self.outcome == "survival":
            loss = cox_partial_likelihood(out, batch["time"], batch["event"])
        else:
            loss = F.binary_cross_entropy_with_logits(out, batch["y"].float())
        return {"loss": loss}

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:  # noqa: D102
        self._seed_step()
        self.batches_seen += 1
        out = self.losses(batch)
        self.log(
            "train/loss",
            out["loss"].detach(),
            on_step=True,
            prog_bar=True,
            batch_size=batch["x"].shape[0],
        )
        return out["loss"]

    def _export_head(self, directory: Path) -> None:
        self._save_head(
            directory,
            self.head,
            {
                "task": "mil",
                "outcome": self.outcome,
                "in_dim": int(self.model.config.embed_dim),
                "hidden_dim": int(self.cfg["task"]["hidden_dim"]),
                "embedding": "mean of forward_rgb tokens",
            },
        )
