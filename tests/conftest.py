"""Shared fixtures: the location of ../shared/data (skip when absent) and the bundled example."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SQUALL_SHARED_DATA", _ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests using it skip when it is absent (e.g. on a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not found at {SHARED_DATA} (set SQUALL_SHARED_DATA to its path)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def write_tiny_cohort():
    """Write slides cut from the bundled example plus a saved tiny model; return (slides dir, model dir).

    Call it with ``(root, {"s1": slice(0, 6), ...})``: each slide keeps the whole H&E and the spots
    and table rows of its slice (spots in their ``microns`` frame).
    """

    def write(root: Path, parts: dict) -> tuple[Path, Path]:
        import spatialdata as sd
        import torch
        from spatialdata.transformations import get_transformation, set_transformation

        import squall_sd as squall

        ex = squall.datasets.example()
        slides = root / "slides"
        slides.mkdir()
        for name, sl in parts.items():
            sub = sd.SpatialData(
                images={"he": ex.images["he"]},
                shapes={"spots": ex.shapes["spots"].iloc[sl]},
                tables={"table": ex.tables["table"][sl].copy()},
            )
            set_transformation(sub.shapes["spots"], get_transformation(ex.shapes["spots"], get_all=True), set_all=True)
            sub.write(slides / f"{name}.zarr")
        torch.manual_seed(0)
        genes = list(ex.tables["table"].var_names[:8])
        model = squall.models.create("squall-tiny", img_size=64, expr_size=16, genes=genes, mpp=4.0)
        model.save_pretrained(root / "model")
        return slides, root / "model"

    return write
