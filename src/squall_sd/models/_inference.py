"""The inference methods of :class:`~squall_sd.models.Squall`: expression with in-forward aggregation, embeddings.

:class:`SquallInference` is a mixin of :class:`~squall_sd.models.Squall`; its methods use the model's
``config``, ``encoder``, ``decoder``, ``device``, ``dtype``, ``gene_index`` and ``_prepare_*`` input
helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F

__all__ = ["GenesLike", "ResLike", "SquallInference"]

ResLike = float | Sequence[float] | torch.Tensor | None
GenesLike = str | int | Sequence[str | int] | None

#: the views of test-time augmentation: (quarter turns, mirrored) of the dihedral group of the square
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def _view(x: torch.Tensor, k: int, flip: bool, dims: tuple[int, int]) -> torch.Tensor:
    """``x`` turned ``k`` quarter turns in the plane ``dims`` (y, x), then mirrored left-right if ``flip``."""
    x = torch.rot90(x, k, dims) if k else x
    return torch.flip(x, (dims[1],)) if flip else x


def _unview(x: torch.Tensor, k: int, flip: bool, dims: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`_view`: turn ``x`` back to the orientation it had before."""
    x = torch.flip(x, (dims[1],)) if flip else x
    return torch.rot90(x, -k, dims) if k else x


class SquallInference:
    """Inference methods of :class:`~squall_sd.models.Squall` (predict, embed, compile)."""

    def _index_tensor(self, genes: GenesLike) -> torch.Tensor | None:
        idx = self.gene_index(genes)
        return None if idx is None else torch.as_tensor(idx, dtype=torch.long, device=self.device)

    def _project(self, h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        fc2 = self.decoder.increase_dim_rgb.fc2
        if idx is None:
            return fc2(h)
        return F.linear(h, fc2.weight[idx], fc2.bias[idx])

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Temporarily switch to eval mode (no drop path) for inference helpers."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @contextlib.contextmanager
    def _autocast(self, enabled: bool | None) -> Iterator[None]:
        dev = self.device.type
        if enabled is None:
            enabled = dev == "cuda"
        if enabled and dev in ("cuda", "cpu") and self.dtype == torch.float32:
            with torch.autocast(dev, dtype=torch.bfloat16):
                yield
        else:
            yield

    def predict(
        self,
        rgb: torch.Tensor,
        res: ResLike = None,
        *,
        genes: GenesLike = None,
        aggregate: Literal["tile"] | torch.Tensor | None = None,
        reduce: Literal["sum", "mean"] | None = None,
        autocast: bool | None = None,
        dense_genes: GenesLike = None,
        tta: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict expression from H&E, optionally aggregated inside the forward pass.

        Aggregation is done on the pre-``fc2`` cell features (``fc2`` is linear, so the weighted sum
        of outputs equals ``fc2`` of the weighted sum, with the bias scaled by the weight sum): the
        dense S × S × G grid is never materialised unless ``aggregate=None``.

        Parameters
        ----------
        rgb
            RGB tiles (B, 3, H, W) or (B, H, W, 3); uint8 (divided by 255) or float in [0, 1].
        res
            µm per pixel, one per tile or a scalar (``None`` → ``config.mpp``).
        genes
            Genes to predict (symbols, Ensembl ids or channel indices); ``None`` = all channels.
            Only the selected rows of ``fc2`` are evaluated.
        aggregate
            ``None``: the dense grid (B, S, S, G). ``"tile"``: one vector per tile (B, G).
            A tensor of region weights or masks (B, R, S, S) or (R, S, S) (shared by all tiles):
            one vector per region (B, R, G), e.g. spots, bins or cells rasterised on the grid.
            The (B, R, S, S) weights may be a sparse COO tensor (each region covers few cells):
            then no dense weight tensor is built.
        reduce
            ``"sum"`` (as the published pooling) or ``"mean"`` (divide by the weight sum; regions
            with zero weight give NaN). ``None`` (default): ``config.region_reduce``, the
            aggregation the model was trained for.
        autocast
            bf16 autocast; default: on for CUDA, off on CPU.
        dense_genes
            Also return the dense grid (B, S, S, len(dense_genes)) of these genes (symbols, Ensembl
            ids or channel indices) from the same forward pass, e.g. to write dense maps while
            aggregating all genes to spots (only these rows of ``fc2`` are evaluated per cell).
        tta
            Test-time augmentation: run the 8 rotations and mirror images of each tile and average
            the predictions, each turned back to the tile's orientation cell by cell (8x the compute).
            Averaging is done on the pre-``fc2`` cell features, which equals averaging the outputs.

        Returns
        -------
        float32 predictions on the model's device, in the pretraining target space; with
        ``dense_genes`` a tuple ``(predictions, dense)``. The model runs in eval mode under
        :func:`torch.inference_mode` (its training flag is restored afterwards).

        """
        if reduce is None:
            reduce = self.config.region_reduce
        if reduce not in ("sum", "mean"):
            raise ValueError(f"`reduce` must be 'sum' or 'mean', found {reduce!r}.")
        with torch.inference_mode(), self._eval_mode():
            idx = self._index_tensor(genes)
            dense_idx = None if dense_genes is None else self._index_tensor(dense_genes)
            if dense_genes is not None and dense_idx is None:  # all channels
                dense_idx = torch.arange(self.n_genes, device=self.device)
            rgb_t = self._prepare_rgb(rgb)
            b = rgb_t.shape[0]
            res_t = self._prepare_res(res, b)
            with self._autocast(autocast):
                if tta:
                    if rgb_t.shape[-1] != rgb_t.shape[-2]:
                        raise ValueError(f"`tta=True` needs square tiles, found {tuple(rgb_t.shape[-2:])}.")
                    h = sum(
                        _unview(
                            self.decoder.expression_features(
                                self.encoder.forward_rgb(_view(rgb_t, k, flip, (2, 3)), res_t)
                            ).float(),
                            k, flip, (1, 2),
                        )
                        for k, flip in DIHEDRAL
                    ) / len(DIHEDRAL)
                else:
                    z = self.encoder.forward_rgb(rgb_t, res_t)
                    h = self.decoder.expression_features(z)
                if aggregate is None:
                    out = self._project(h, idx).float()
                    if dense_idx is None:
                        return out
            if aggregate is None:
                return out, self._dense(h, dense_idx)
            out = self._aggregate(h, idx, aggregate, reduce)
            return out if dense_idx is None else (out, self._dense(h, dense_idx))

    def _dense(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Dense float32 grid (B, S, S, len(idx)) of channels ``idx`` from cell features."""
        fc2 = self.decoder.increase_dim_rgb.fc2
        return F.linear(h.float(), fc2.weight[idx].float(), fc2.bias[idx].float())

    def _aggregate(self, h: torch.Tensor, idx: torch.Tensor | None, aggregate: Any, reduce: str) -> torch.Tensor:
        """Region (or tile) vectors from cell features ``h`` (B, S, S, E); see :meth:`predict`."""
        c = self.config
        b = h.shape[0]
        fc2 = self.decoder.increase_dim_rgb.fc2
        weight = fc2.weight if idx is None else fc2.weight[idx]
        bias = fc2.bias if idx is None else fc2.bias[idx]
        weight, bias, h = weight.float(), bias.float(), h.float()
        s = c.expr_size
        if isinstance(aggregate, str):
            if aggregate != "tile":
                raise ValueError(f"`aggregate` must be None, 'tile' or a weight tensor, found {aggregate!r}.")
            hs = h.sum(dim=(1, 2))
            if reduce == "mean":
                return F.linear(hs / (s * s), weight, bias)
            return F.linear(hs, weight) + bias * float(s * s)
        if isinstance(aggregate, torch.Tensor) and aggregate.is_sparse:
            return self._aggregate_sparse(h, aggregate, weight, bias, reduce)
        w = torch.as_tensor(aggregate).to(self.device, torch.float32)
        if w.ndim == 3:
            w = w.unsqueeze(0).expand(b, -1, -1, -1)
        if w.ndim != 4 or w.shape[0] != b or w.shape[2:] != (s, s):
            raise ValueError(
                f"Region weights must have shape (B={b}, R, {s}, {s}) or (R, {s}, {s}), found "
                f"{tuple(torch.as_tensor(aggregate).shape)}."
            )
        hs = torch.einsum("brij,bije->bre", w, h)
        wsum = w.sum(dim=(2, 3))
        if reduce == "mean":
            return F.linear(hs / wsum[..., None], weight, bias)
        return F.linear(hs, weight) + wsum[..., None] * bias

    def _aggregate_sparse(
        self, h: torch.Tensor, aggregate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, reduce: str
    ) -> torch.Tensor:
        """Region vectors from a sparse COO weight tensor (B, R, S, S): no dense weights are built."""
        b, s = h.shape[0], self.config.expr_size
        if aggregate.ndim != 4 or aggregate.shape[0] != b or tuple(aggregate.shape[2:]) != (s, s):
            raise ValueError(f"Region weights must have shape (B={b}, R, {s}, {s}), found {tuple(aggregate.shape)}.")
        r = aggregate.shape[1]
        w = aggregate.coalesce().to(self.device)
        bi, ri, yi, xi = w.indices()
        vals = w.values().to(torch.float32)
        # (B*R) x (B*S*S) sparse matrix times the (B*S*S, E) cell features
        m = torch.sparse_coo_tensor(
            torch.stack([bi * r + ri, (bi * s + yi) * s + xi]),
            vals,
            (b * r, b * s * s),
            check_invariants=False,  # indices come from a coalesced tensor; also silences torch's warning
        )
        hs = torch.sparse.mm(m, h.reshape(b * s * s, -1)).reshape(b, r, -1)
        wsum = torch.zeros(b * r, dtype=torch.float32, device=h.device).index_add_(0, bi * r + ri, vals)
        wsum = wsum.reshape(b, r)
        if reduce == "mean":
            return F.linear(hs / wsum[..., None], weight, bias)
        return F.linear(hs, weight) + wsum[..., None] * bias

    def embed(
        self,
        rgb: torch.Tensor,
        res: ResLike = None,
        *,
        pool: Literal["mean"] | None = "mean",
        autocast: bool | None = None,
    ) -> torch.Tensor:
        """H&E embeddings for downstream tools (``forward_rgb`` under inference mode).

        Parameters
        ----------
        rgb
            RGB tiles.
        res
            µm per pixel, one per tile.
        pool
            ``"mean"``: one (B, D) vector per tile; ``None``: tokens (B, N, D).
        autocast
            bf16 autocast; default: on for CUDA, off on CPU.

        Returns
        -------
        float32 embeddings.

        """
        with torch.inference_mode(), self._eval_mode(), self._autocast(autocast):
            z = self.forward_rgb(rgb, res)
        z = z.float()
        if pool == "mean":
            return z.mean(dim=1)
        if pool is None:
            return z
        raise ValueError(f"`pool` must be 'mean' or None, found {pool!r}.")

    def compile_inference(self, **kwargs: Any) -> Self:
        """Compile the H&E → expression path in place with :func:`torch.compile` (names unchanged).

        Parameters
        ----------
        **kwargs
            Passed to :meth:`torch.nn.Module.compile` (e.g. ``mode="max-autotune"``).

        Returns
        -------
        ``self``.

        """
        for blk in self.encoder.blocks.blocks:
            blk.compile(**kwargs)
        for blk in self.decoder.decoder_rgb.blocks:
            blk.compile(**kwargs)
        return self
