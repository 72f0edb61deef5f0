"""Data of the slide-level (MIL) fine-tuning task: bags of frozen tile embeddings per slide."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from squall_sd._logging import logger
from squall_sd.train._data import ShardDataset, collate_tiles


class _MILDataModule(pl.LightningDataModule):
    """Bags of frozen tile embeddings per slide, computed once and cached in the run folder."""

    def __init__(self, cfg: Mapping[str, Any], model: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.bags: dict[str, torch.Tensor] | None = None

    def sync_position(self, batches_seen: int) -> None:  # full batch: nothing to skip
        return None

    def _embed(self) -> tuple[list[str], list[torch.Tensor]]:
        cache = Path(self.cfg["run_dir"]).expanduser() / "mil_embeddings.pt"
        if cache.is_file():
            data = torch.load(cache, weights_only=True)
            return list(data["slides"]), list(data["bags"])
        ds = ShardDataset(
            self.cfg["data"]["train"],
            batch_size=int(self.cfg["data"]["batch_size"]),
            shuffle=False,
            augment=None,
            drop_last=False,
            rank=0,
            world_size=1,
        )
        cap = int(self.cfg["task"]["max_tiles_per_slide"])
        names = [s["id"] for s in ds.slides]
        feats: dict[int, list[torch.Tensor]] = {}
        loader = torch.utils.data.DataLoader(ds, batch_size=ds.batch_size, collate_fn=collate_tiles)
        self.model.eval()
        for batch in loader:
            emb = self.model.embed(batch["rgb"], batch["res"], pool="mean").cpu()
            for e, s in zip(emb, batch["slide"].tolist(), strict=True):
                if len(feats.setdefault(s, [])) < cap:
                    feats[s].append(e)
        slides = [names[s] for s in sorted(feats)]
        bags = [torch.stack(feats[s]) for s in sorted(feats)]
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"slides": slides, "bags": bags}, cache)
        return slides, bags

    def setup(self, stage: str | None = None) -> None:  # noqa: D102
        import pandas as pd

        if self.bags is not None:
            return
        task = self.cfg["task"]
        if task["slide_labels"] is None:
            raise ValueError(
                "task.slide_labels (a CSV with slide and time/event or label columns) is required for MIL."
            )
        labels = pd.read_csv(task["slide_labels"])
        if "slide" not in labels:
            raise KeyError(f"{task['slide_labels']!r} needs a 'slide' column; found {list(labels.columns)}.")
        need = ["time", "event"] if task["outcome"] == "survival" else ["label"]
        miss = [c for c in need if c not in labels]
        if miss:
            raise KeyError(f"{task['slide_labels']!r} lacks the column(s) {miss} for outcome {task['outcome']!r}.")
        slides, bags = self._embed()
        labels = labels.set_index(labels["slide"].astype(str))
        keep = [i for i, s in enumerate(slides) if s in labels.index]
        if len(keep) < 2:
            raise ValueError(f"Only {len(keep)} slides of the data have labels; need at least 2.")
        slides = [slides[i] for i in keep]
        bags = [bags[i] for i in keep]
        t = max(len(b) for b in bags)
        x = torch.zeros(len(bags), t, bags[0].shape[1])
        mask = torch.zeros(len(bags), t, dtype=torch.bool)
        for i, b in enumerate(bags):
            x[i, : len(b)] = b
            mask[i, : len(b)] = True
        self.bags = {"x": x, "mask": mask, "slides": slides}
        if task["outcome"] == "survival":
            self.bags["time"] = torch.tensor(labels.loc[slides, "time"].to_numpy(dtype=np.float32))
            self.bags["event"] = torch.tensor(labels.loc[slides, "event"].to_numpy(dtype=np.float32))
        else:
            self.bags["y"] = torch.tensor(labels.loc[slides, "label"].to_numpy(dtype=np.float32))
        logger.info("MIL: %d slides, up to %d tiles each", len(slides), t)

    def train_dataloader(self) -> torch.utils.data.DataLoader:  # noqa: D102
        bags = {k: v for k, v in self.bags.items() if isinstance(v, torch.Tensor)}
        n = bags["x"].shape[0]
        ds = _FullBatch(bags, n)
        return torch.utils.data.DataLoader(ds, batch_size=None)


class _FullBatch(torch.utils.data.Dataset):
    """One item per epoch: all bags (Cox risk sets need the whole cohort)."""

    def __init__(self, bags: dict[str, torch.Tensor], n: int) -> None:
        self.bags = bags

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.bags
