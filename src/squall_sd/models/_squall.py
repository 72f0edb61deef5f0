"""The SQUALL model: MultiWay encoder, two decoders, LinearShuffle expression head and RGB head."""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from squall_sd.models._config import SquallConfig
from squall_sd.models._genes import GeneVocabulary
from squall_sd.models._layers import (
    ConvStem,
    DecoderStack,
    LinearShuffle,
    MultiWayEncoder,
    PatchEmbed,
    PositionEmbeddingMLP,
    Route,
)

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PretrainOutput", "Squall", "SquallDecoder", "SquallEncoder"]

ResLike = float | Sequence[float] | torch.Tensor | None
GenesLike = str | int | Sequence[str | int] | None


class PretrainOutput(NamedTuple):
    """Losses of the complementary-masking pretraining forward (``rgb_loss, expr_loss``)."""

    #: SmoothL1 between predicted and input RGB over pixels whose token carried expression.
    rgb_loss: torch.Tensor
    #: SmoothL1 between predicted and input expression over cells whose token carried RGB.
    expr_loss: torch.Tensor


class SquallEncoder(nn.Module):
    """Patch embeddings, MLP position embedding and the MultiWay transformer.

    Parameters
    ----------
    config
        The architecture.

    """

    def __init__(self, config: SquallConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        stem = ConvStem if c.stem == "conv" else PatchEmbed
        self.patch_embed_rgb = stem(c.img_size, c.patch_size, 3, c.embed_dim)
        self.patch_embed_expr = nn.Sequential(
            nn.Conv2d(c.n_genes, c.expr_embed_dim, kernel_size=1),
            PatchEmbed(c.expr_size, c.expr_patch, c.expr_embed_dim, c.embed_dim),
        )
        self.pos_embed = PositionEmbeddingMLP(c.grid, c.embed_dim, eps=c.norm_eps)
        self.blocks = MultiWayEncoder(
            c.embed_dim,
            c.depth,
            c.merge_layer_depth,
            c.num_heads,
            c.mlp_hidden,
            qkv_bias=c.qkv_bias,
            rpb_hidden=c.rpb_hidden,
            drop_path_rate=c.drop_path_rate,
            eps=c.norm_eps,
        )

    def embed_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB tokens (B, N, D) from a (B, 3, H, W) tile in [0, 1], without position embedding."""
        return self.patch_embed_rgb(rgb)

    def embed_expr(self, expr: torch.Tensor) -> torch.Tensor:
        """Expression tokens (B, N, D) from a (B, G, S, S) grid, without position embedding."""
        return self.patch_embed_expr(expr)

    def forward_tokens(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Run the MultiWay blocks and the final norm on tokens that already carry positions."""
        return self.blocks(x, route)

    def forward_rgb(self, rgb: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Encode an RGB tile: (B, 3, H, W), res (B,) → (B, N, D)."""
        x = self.embed_rgb(rgb) + self.pos_embed(res)
        return self.blocks(x, "rgb")

    def forward_expr(self, expr: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Encode an expression grid: (B, G, S, S), res (B,) → (B, N, D)."""
        x = self.embed_expr(expr) + self.pos_embed(res)
        return self.blocks(x, "expr")

    def forward_all(self, rgb: torch.Tensor, expr: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Encode both modalities jointly: [RGB tokens ‖ expression tokens] → (B, 2N, D)."""
        pos = self.pos_embed(res)
        x = torch.cat([self.embed_rgb(rgb) + pos, self.embed_expr(expr) + pos], dim=1)
        return self.blocks(x, x.shape[1] // 2)

    def forward_mixed(
        self, rgb: torch.Tensor, expr: torch.Tensor, res: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Encode complementary-mixed tokens: RGB where ``mask`` (B, N) is True, else expression."""
        x = torch.where(mask[..., None], self.embed_rgb(rgb), self.embed_expr(expr))
        return self.blocks(x + self.pos_embed(res), mask)


class SquallDecoder(nn.Module):
    """The two decoders and the output heads.

    ``decoder_rgb`` + ``increase_dim_rgb`` decode tokens into the **expression** grid and
    ``decoder_expr`` + ``increase_dim_expr`` decode tokens into **RGB** pixels (the names refer to
    the source modality in pretraining).

    Parameters
    ----------
    config
        The architecture.

    """

    def __init__(self, config: SquallConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        kw: dict[str, Any] = {
            "qkv_bias": c.qkv_bias,
            "rpb_hidden": c.rpb_hidden,
            "drop_path_rate": c.drop_path_rate,
            "eps": c.norm_eps,
        }
        self.decoder_rgb = DecoderStack(
            c.embed_dim, c.decoder_depth, c.num_heads, c.mlp_hidden, **kw
        )
        self.decoder_expr = DecoderStack(
            c.embed_dim, c.decoder_depth, c.num_heads, c.mlp_hidden, **kw
        )
        self.increase_dim_rgb = LinearShuffle(
            c.embed_dim, c.expr_embed_dim, c.expr_patch, c.n_genes
        )
        self.increase_dim_expr = nn.Linear(c.embed_dim, 3 * c.patch_size**2)

    def expression_features(self, z: torch.Tensor) -> torch.Tensor:
        """Pre-``fc2`` cell features (B, S, S, inner) of the expression head from encoder tokens."""
        return self.increase_dim_rgb.features(self.decoder_rgb(z))

    def expression(self, z: torch.Tensor) -> torch.Tensor:
        """Expression grid (B, S, S, G) from encoder tokens (B, N, D)."""
        return self.increase_dim_rgb(self.decoder_rgb(z))

    def rgb_head(self, x: torch.Tensor) -> torch.Tensor:
        """RGB head on decoded tokens (B, N, D) → (B, H, W, 3) by a literal C-order reshape.

        Pixel (y, x, ch) with k = H·y + x comes from token ``k // p²`` and output index
        ``3·(k % p²) + ch`` (p = patch size), exactly as the published model.
        """
        s = self.config.img_size
        return self.increase_dim_expr(x).reshape(x.shape[0], s, s, 3)

    def rgb(self, z: torch.Tensor) -> torch.Tensor:
        """RGB image (B, H, W, 3), channel last, from encoder tokens (B, N, D)."""
        return self.rgb_head(self.decoder_expr(z))


class Squall(nn.Module):
    """SQUALL H&E + expression model (published layout at the ``squall-555m`` configuration).

    Create models with :func:`squall_sd.models.create` (random weights) or
    :func:`squall_sd.models.load` (weights); the state-dict names follow the published checkpoint
    exactly, so official checkpoints load strictly.

    Parameters
    ----------
    config
        The architecture and preprocessing contract.
    vocabulary
        Gene vocabulary (channel order). Defaults to ``config.genes`` when that is set.
    init_weights
        Initialise the weights as described by ``config.init``; pass ``False`` when weights are
        loaded right after construction.

    Notes
    -----
    Inputs: RGB tiles of ``config.img_size`` px scaled to [0, 1] (uint8 input is divided by 255), no
    mean/std normalisation; ``res`` = µm per pixel of the tile, one value per sample (a scalar is
    broadcast; ``None`` means ``config.mpp``).

    """

    def __init__(
        self,
        config: SquallConfig,
        *,
        vocabulary: GeneVocabulary | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = SquallEncoder(config)
        self.decoder = SquallDecoder(config)
        self._vocabulary: GeneVocabulary | None = None
        if vocabulary is None and config.genes is not None:
            vocabulary = GeneVocabulary(config.genes)
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        #: sha256 of the weights file the model was loaded from (provenance), if any.
        self.weights_sha256: str | None = None
        #: where the weights came from (name, directory or file), if loaded.
        self.weights_source: str | None = None
        if init_weights and self.device.type != "meta":
            self.init_weights()

    # ---------------------------------------------------------------------------------------
    # weights, genes
    # ---------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """(Re)initialise all weights as described by ``config.init``.

        The 3×3 convolutions of a convolutional stem (``config.stem == "conv"``) always get He
        initialisation, as they feed BatchNorm + ReLU.
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if self.config.init == "squall":
                    nn.init.normal_(m.weight, mean=0.02, std=0.01)
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        stem = getattr(self.encoder.patch_embed_rgb, "stem", None)
        if stem is not None:  # 3×3 convolutions followed by BatchNorm + ReLU: He initialisation
            for m in stem.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def vocabulary(self) -> GeneVocabulary | None:
        """Gene vocabulary in channel order, or ``None`` if the gene names are unknown."""
        return self._vocabulary

    @property
    def genes(self) -> list[str] | None:
        """Gene symbols in channel order, or ``None`` if unknown."""
        return None if self._vocabulary is None else list(self._vocabulary.symbols)

    @property
    def n_genes(self) -> int:
        """Number of gene channels."""
        return self.config.n_genes

    def set_vocabulary(self, vocabulary: GeneVocabulary | Sequence[str]) -> None:
        """Attach a gene vocabulary (its length must equal the number of channels).

        Parameters
        ----------
        vocabulary
            A :class:`~squall_sd.models.GeneVocabulary` or a list of gene symbols in channel order.

        """
        if not isinstance(vocabulary, GeneVocabulary):
            vocabulary = GeneVocabulary(list(vocabulary))
        if len(vocabulary) != self.config.n_genes:
            raise ValueError(
                f"The gene vocabulary has {len(vocabulary)} genes but the model has "
                f"{self.config.n_genes} "
                "channels; pass the gene-order file that belongs to these weights."
            )
        self._vocabulary = vocabulary
        if self.config.genes is None or tuple(self.config.genes) != tuple(vocabulary.symbols):
            self.config = self.config.replace(genes=tuple(vocabulary.symbols))
            self.encoder.config = self.decoder.config = self.config

    def gene_index(self, genes: GenesLike) -> list[int] | None:
        """Channel indices for ``genes`` (symbols, Ensembl ids or indices); ``None`` → all channels.

        Parameters
        ----------
        genes
            Genes to select.

        Returns
        -------
        Channel indices, or ``None`` for all.

        """
        if genes is None:
            return None
        if self._vocabulary is None:
            items = [genes] if isinstance(genes, (str, numbers.Integral)) else list(genes)
            if any(not isinstance(g, numbers.Integral) for g in items):
                raise KeyError(
                    "This model has no gene vocabulary, so genes can only be selected by channel "
                    "index; "
                    "load it with `genes_file=` (the official gene-order file) to select by name."
                )
            return GeneVocabulary([str(i) for i in range(self.n_genes)]).index(items)
        return self._vocabulary.index(genes)

    def save_pretrained(
        self, directory: str | os.PathLike[str], *, overwrite: bool = False
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` (+ ``.sha256``) and ``genes.txt``.

        Parameters
        ----------
        directory
            Output directory (created if needed).
        overwrite
            Replace existing files instead of raising :class:`FileExistsError`.

        Returns
        -------
        The directory.

        """
        from squall_sd.models._io import save_pretrained

        return save_pretrained(self, directory, overwrite=overwrite)

    # ---------------------------------------------------------------------------------------
    # input handling
    # ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.encoder.patch_embed_rgb.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.encoder.patch_embed_rgb.proj.weight.dtype

    def _prepare_rgb(self, rgb: Any) -> torch.Tensor:
        rgb = torch.as_tensor(rgb)
        if rgb.ndim == 3:
            rgb = rgb[None]
        if rgb.ndim != 4:
            raise ValueError(
                "Expected RGB tiles of shape (B, 3, H, W) or (B, H, W, 3), found "
                f"{tuple(rgb.shape)}."
            )
        if rgb.shape[1] != 3 and rgb.shape[-1] == 3:
            rgb = rgb.permute(0, 3, 1, 2)
        if rgb.shape[1] != 3:
            raise ValueError(f"Expected 3 colour channels, found shape {tuple(rgb.shape)}.")
        rgb = rgb.to(self.device, non_blocking=True)
        if rgb.dtype == torch.uint8:
            rgb = rgb.to(self.dtype) / 255.0
        elif not rgb.is_floating_point():
            raise TypeError(f"RGB tiles must be uint8 (0-255) or float (0-1), found {rgb.dtype}.")
        else:
            rgb = rgb.to(self.dtype)
        return rgb.contiguous()

    def _prepare_expr(self, expr: Any) -> torch.Tensor:
        c = self.config
        if isinstance(expr, torch.Tensor) and expr.is_sparse:
            expr = expr.to_dense()
        elif isinstance(expr, torch.Tensor) and expr.layout in (torch.sparse_csr, torch.sparse_csc):
            expr = expr.to_dense()
        expr = torch.as_tensor(expr)
        if expr.ndim == 3:  # (B, S*S, G), rows y-major
            if expr.shape[1:] != (c.expr_size**2, c.n_genes):
                raise ValueError(
                    f"Expected a cell × gene matrix per tile of shape (B, {c.expr_size**2}, "
                    f"{c.n_genes}), "
                    f"found {tuple(expr.shape)}."
                )
            expr = expr.reshape(expr.shape[0], c.expr_size, c.expr_size, c.n_genes).permute(
                0, 3, 1, 2
            )
        if expr.ndim != 4 or expr.shape[1:] != (c.n_genes, c.expr_size, c.expr_size):
            raise ValueError(
                f"Expected an expression grid of shape (B, {c.n_genes}, {c.expr_size}, "
                f"{c.expr_size}), "
                f"found {tuple(expr.shape)}."
            )
        return expr.to(self.device, self.dtype, non_blocking=True).contiguous()

    def _prepare_res(self, res: ResLike, batch: int) -> torch.Tensor:
        if res is None:
            res = self.config.mpp
        r = torch.as_tensor(res, dtype=torch.float32).to(self.device).reshape(-1)
        if r.numel() == 1:
            r = r.expand(batch)
        if r.numel() != batch:
            raise ValueError(
                f"`res` needs 1 or {batch} values (µm/px per tile), found {r.numel()}."
            )
        return r

    # ---------------------------------------------------------------------------------------
    # official entry points
    # ---------------------------------------------------------------------------------------
    def forward(
        self,
        rgb: torch.Tensor,
        expr: torch.Tensor,
        res: ResLike = None,
        *,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PretrainOutput:
        """Complementary-masking pretraining forward.

        Every token position carries exactly one modality (RGB where ``mask`` is True, drawn with
        probability ``config.mask_ratio``); both decoders read the same encoding, and each
        position is scored on the modality it did not see.

        Parameters
        ----------
        rgb
            RGB tiles (B, 3, H, W) in [0, 1].
        expr
            Expression grids (B, G, S, S), or per-tile cell × gene matrices (B, S², G) with
            y-major rows (dense or sparse).
        res
            µm per pixel, one per tile (scalar broadcast; ``None`` → ``config.mpp``).
        mask
            Optional bool (B, N) token mask (True = RGB); drawn at random when omitted.
        generator
            Random generator for the mask.

        Returns
        -------
        ``(rgb_loss, expr_loss)``, both SmoothL1 (β = 1, mean).

        """
        c = self.config
        rgb = self._prepare_rgb(rgb)
        expr = self._prepare_expr(expr)
        b = rgb.shape[0]
        res_t = self._prepare_res(res, b)
        if mask is None:
            mask = (
                torch.rand(b, c.num_tokens, device=self.device, generator=generator) < c.mask_ratio
            )
        mask = mask.to(self.device, torch.bool)
        if mask.shape != (b, c.num_tokens):
            raise ValueError(
                f"`mask` must have shape ({b}, {c.num_tokens}), found {tuple(mask.shape)}."
            )
        z = self.encoder.forward_mixed(rgb, expr, res_t, mask)
        grid_mask = mask.reshape(b, c.grid, c.grid)

        # expression, scored where the token carried RGB
        h = self.decoder.expression_features(z)
        cell_sel = grid_mask.repeat_interleave(c.expr_patch, 1).repeat_interleave(c.expr_patch, 2)
        target_expr = expr.permute(0, 2, 3, 1)
        pred_expr = self.decoder.increase_dim_rgb.fc2(h[cell_sel])
        expr_loss = _smooth_l1(pred_expr, target_expr[cell_sel])

        # RGB, scored where the token carried expression
        pred_rgb = self.decoder.rgb(z)
        px_sel = ~grid_mask.repeat_interleave(c.patch_size, 1).repeat_interleave(c.patch_size, 2)
        rgb_loss = _smooth_l1(pred_rgb[px_sel], rgb.permute(0, 2, 3, 1)[px_sel])
        return PretrainOutput(rgb_loss, expr_loss)

    def forward_rgb(self, rgb: torch.Tensor, res: ResLike = None) -> torch.Tensor:
        """H&E → tokens: (B, 3, H, W) → (B, N, D) after the final LayerNorm.

        Parameters
        ----------
        rgb
            RGB tiles in [0, 1] (channel first or last; uint8 is divided by 255).
        res
            µm per pixel, one per tile.

        Returns
        -------
        Token embeddings (B, N, D).

        """
        rgb = self._prepare_rgb(rgb)
        return self.encoder.forward_rgb(rgb, self._prepare_res(res, rgb.shape[0]))

    def forward_expr(self, expr: torch.Tensor, res: ResLike = None) -> torch.Tensor:
        """Expression → tokens: (B, G, S, S) → (B, N, D).

        Parameters
        ----------
        expr
            Expression grids (channels first) or (B, S², G) cell × gene matrices.
        res
            µm per pixel, one per tile.

        Returns
        -------
        Token embeddings (B, N, D).

        """
        expr = self._prepare_expr(expr)
        return self.encoder.forward_expr(expr, self._prepare_res(res, expr.shape[0]))

    def forward_all(
        self, rgb: torch.Tensor, expr: torch.Tensor, res: ResLike = None
    ) -> torch.Tensor:
        """Joint encoding: returns (B, 2N, D); ``[:, :N]`` RGB half, ``[:, N:]`` expression half.

        The relative position bias follows the published rule for 2N tokens literally (a fictitious
        square layout), which is required to reproduce official embeddings.

        Parameters
        ----------
        rgb
            RGB tiles.
        expr
            Expression grids.
        res
            µm per pixel, one per tile.

        Returns
        -------
        Token embeddings (B, 2N, D).

        """
        rgb = self._prepare_rgb(rgb)
        expr = self._prepare_expr(expr)
        return self.encoder.forward_all(rgb, expr, self._prepare_res(res, rgb.shape[0]))

    def forward_rgb_to_expr(
        self, rgb: torch.Tensor, res: ResLike = None, *, genes: GenesLike = None
    ) -> torch.Tensor:
        """H&E → expression grid (B, S, S, G) (S = ``expr_size``; G = all or the selected genes).

        Parameters
        ----------
        rgb
            RGB tiles (B, 3, H, W) or (B, H, W, 3) in [0, 1].
        res
            µm per pixel, one per tile.
        genes
            Optional subset of genes (only those output channels are computed).

        Returns
        -------
        Expression grid, channel last, in the pretraining target space (no activation).

        """
        z = self.forward_rgb(rgb, res)
        return self._project(self.decoder.expression_features(z), self._index_tensor(genes))

    def forward_all_to_expr(
        self, rgb: torch.Tensor, expr: torch.Tensor, res: ResLike = None, *, genes: GenesLike = None
    ) -> torch.Tensor:
        """Joint encoding, then decode the RGB half into an expression grid (B, S, S, G).

        Parameters
        ----------
        rgb
            RGB tiles.
        expr
            Expression grids.
        res
            µm per pixel, one per tile.
        genes
            Optional subset of genes.

        Returns
        -------
        Expression grid, channel last.

        """
        z = self.forward_all(rgb, expr, res)
        z = z[:, : z.shape[1] // 2]
        return self._project(self.decoder.expression_features(z), self._index_tensor(genes))

    def forward_rgb_reconstruction(self, z: torch.Tensor) -> torch.Tensor:
        """Decode encoder tokens into RGB (B, H, W, 3) (decoder_expr, then increase_dim_expr)."""
        return self.decoder.rgb(z)

    # ---------------------------------------------------------------------------------------
    # fast inference
    # ---------------------------------------------------------------------------------------
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

    def _aggregate(
        self, h: torch.Tensor, idx: torch.Tensor | None, aggregate: Any, reduce: str
    ) -> torch.Tensor:
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
                raise ValueError(
                    f"`aggregate` must be None, 'tile' or a weight tensor, found {aggregate!r}."
                )
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
            raise ValueError(
                f"Region weights must have shape (B={b}, R, {s}, {s}), found {tuple(aggregate.shape)}."
            )
        r = aggregate.shape[1]
        w = aggregate.coalesce().to(self.device)
        bi, ri, yi, xi = w.indices()
        vals = w.values().to(torch.float32)
        # (B*R) x (B*S*S) sparse matrix times the (B*S*S, E) cell features
        m = torch.sparse_coo_tensor(
            torch.stack([bi * r + ri, (bi * s + yi) * s + xi]), vals, (b * r, b * s * s),
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

    def compile_inference(self, **kwargs: Any) -> Squall:
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

    def extra_repr(self) -> str:  # noqa: D102
        c = self.config
        return (
            f"name={c.name!r}, embed_dim={c.embed_dim}, depth={c.depth}, "
            f"merge={c.merge_layer_depth}, "
            f"decoder_depth={c.decoder_depth}, n_genes={c.n_genes}, img_size={c.img_size}, "
            f"mpp={c.mpp}"
        )


def _smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.numel() == 0:
        return pred.sum() * 0.0
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return F.smooth_l1_loss(pred.to(dtype), target.to(dtype), beta=1.0)
