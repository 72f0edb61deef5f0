"""Use squall_sd models in the benchmark: load by name / path (or random-init), embed, predict."""

from __future__ import annotations

import numpy as np
import torch


class ModelUnavailable(RuntimeError):
    """The requested model cannot be built or loaded (yet); the benchmark skips its row."""


def load_model(spec: str, seed: int = 0):
    """``random:<config>`` builds a randomly initialised model; anything else goes to ``models.load``."""
    import squall_sd

    models = squall_sd.models
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        create = getattr(models, "create", None)
        if create is None:
            raise ModelUnavailable("squall_sd.models.create does not exist yet")
        torch.manual_seed(seed)
        model = create(name)
    else:
        load = getattr(models, "load", None)
        if load is None:
            raise ModelUnavailable("squall_sd.models.load does not exist yet")
        try:
            model = load(spec)
        except (FileNotFoundError, KeyError, ValueError, NotImplementedError) as e:
            raise ModelUnavailable(f"{spec!r} could not be loaded: {e}") from e
    model.eval()
    return model


def model_view(model, secs: dict, mpp: float) -> dict[str, np.ndarray]:
    """Each section's (n, P, P, 3) tiles as ``model`` sees them: degraded to its
    ``config.effective_mpp`` where the section's image is sharper (as ``tl.predict_expression`` and
    training with ``data.effective_mpp`` do); the tiles themselves for a model without one."""
    from squall_sd.pp import degrade_patches
    from squall_sd.pp._resolution import degrade_target

    eff = getattr(model.config, "effective_mpp", None)
    out = {}
    for n, s in secs.items():
        to = degrade_target(s.image_mpp, mpp, eff)
        if to is None:
            out[n] = s.patches
        else:
            out[n] = degrade_patches(s.patches.transpose(0, 3, 1, 2), mpp, to).transpose(0, 2, 3, 1)
    return out


@torch.no_grad()
def embed_tiles(model, tiles: np.ndarray, mpp: float, batch: int = 64) -> np.ndarray:
    """Mean-pooled ``forward_rgb`` tokens per tile (the model's ``embed``)."""
    out = []
    for b in range(0, len(tiles), batch):
        x = torch.from_numpy(np.ascontiguousarray(tiles[b : b + batch]))
        out.append(model.embed(x, res=mpp, pool="mean").float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def spot_weights(model, mpp: float, spot_diameter_um: float = 100.0) -> torch.Tensor:
    """(1, S, S) mask of the expression-grid cells whose centres lie inside the spot disc."""
    s = model.config.expr_size
    cell_um = model.config.img_size * mpp / s
    c = (np.arange(s) + 0.5) * cell_um - model.config.img_size * mpp / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    mask = (xx**2 + yy**2) <= (spot_diameter_um / 2) ** 2
    return torch.from_numpy(mask[None].astype(np.float32))


@torch.no_grad()
def predict_spots(
    model, tiles: np.ndarray, mpp: float, genes: list[str], batch: int = 32, tta: bool = False
) -> tuple[np.ndarray, list[str], str]:
    """Predicted expression of ``genes`` (those in the model's vocabulary) averaged over each spot disc.

    Uses ``model.predict`` with the spot disc as aggregation weights (``reduce="mean"``) on the
    benchmark's own tiles (``squall_sd.tl.predict_expression`` works on a SpatialData and cuts its
    own tiles; switch to it once it can take the same tiles). Returns predictions, the genes
    predicted and the path used. ``tta``: average over the 8 rotations / mirror images of each tile
    (``model.predict(tta=True)``).
    """
    vocab = model.genes
    if vocab is None:
        raise ModelUnavailable("the model has no gene vocabulary")
    known = [g for g in genes if g in set(vocab)]
    if not known:
        raise ModelUnavailable("none of the benchmark genes are in the model's vocabulary")
    w = spot_weights(model, mpp)
    out = []
    for b in range(0, len(tiles), batch):
        x = torch.from_numpy(np.ascontiguousarray(tiles[b : b + batch]))
        p = model.predict(x, res=mpp, genes=known, aggregate=w, reduce="mean", tta=tta)  # (B, 1, G)
        out.append(p[:, 0].float().cpu().numpy())
    return (
        np.concatenate(out).astype(np.float64),
        known,
        "model.predict(aggregate=spot disc, reduce='mean'" + (", tta=True)" if tta else ")"),
    )
