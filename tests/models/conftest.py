"""Fixtures of the model tests: the published state-dict manifest and small random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import squall_sd.models as sm

_HERE = Path(__file__).resolve().parent
_SHARED_MANIFEST = _HERE.parents[2] / "shared" / "design" / "squall_555m_state_dict.json"
_LOCAL_MANIFEST = _HERE / "data" / "squall_555m_state_dict.json"

GENES = [f"G{i}" for i in range(24)]


def _read(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(shape)) for name, shape in json.loads(path.read_text())]


@pytest.fixture(scope="session")
def manifest_shared() -> list[tuple[str, tuple[int, ...]]]:
    """The manifest from ../shared/design (skips when that checkout is absent)."""
    if not _SHARED_MANIFEST.is_file():
        pytest.skip(f"{_SHARED_MANIFEST} not found")
    return _read(_SHARED_MANIFEST)


@pytest.fixture(scope="session")
def manifest() -> list[tuple[str, tuple[int, ...]]]:
    """The manifest copy bundled with the tests (spec-derived data)."""
    return _read(_LOCAL_MANIFEST)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.08) -> torch.nn.Module:
    """Fill every parameter (LayerNorm affine included) with random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g, dtype=torch.float64)
                if isinstance(module, torch.nn.LayerNorm) and name == "weight":
                    r = 1.0 + 0.1 * r
                else:
                    r = scale * r
                p.copy_(r.to(p.dtype))
    return model


def micro_config(**overrides) -> sm.SquallConfig:
    """A very small configuration (fast on CPU) that keeps the published tile geometry."""
    kw = dict(
        embed_dim=32,
        depth=3,
        merge_layer_depth=2,
        num_heads=2,
        decoder_depth=1,
        rpb_hidden=8,
        genes=GENES,
        drop_path_rate=0.0,
    )
    kw.update(overrides)
    return sm.get_config("squall-tiny", **kw)


@pytest.fixture
def micro_model() -> sm.Squall:
    torch.manual_seed(0)
    return randomize_(sm.Squall(micro_config())).eval()


@pytest.fixture
def tiles() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 224, 224, generator=g)


@pytest.fixture
def expr_grid() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return (torch.rand(2, len(GENES), 56, 56, generator=g) > 0.7).float()
