"""The SQUALL model: MultiWay encoder, two decoders, LinearShuffle expression head and RGB head."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from squall_sd.models._config import SquallConfig
from squall_sd.models._genes import GeneVocabulary
from squall_sd.models._inference import GenesLike, ResLike, SquallInference
from squall_sd.models._layers import (
    ConvStem,
    DecoderStack,
    LinearShuffle,
    MultiWayEncoder,
    PatchEmbed,
    PositionEmbeddingMLP,
    Route,
)
from squall_sd.models._weights import save_pretrained as _save_pretrained

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PretrainOutput", "Squall", "SquallDecoder", "SquallEncoder"]


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
        self.decoder_rgb = DecoderStack(c.embed_dim, c.decoder_depth, c.num_heads, c.mlp_hidden, **kw)
        self.decoder_expr = DecoderStack(c.embed_dim, c.decoder_depth, c.num_heads, c.mlp_hidden, **kw)
        self.increase_dim_rgb = LinearShuffle(c.embed_dim, c.expr_embed_dim, c.expr_patch, c.n_genes)
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


class Squall(SquallInference, nn.Module):
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

    def save_pretrained(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
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
        return _save_pretrained(self, directory, overwrite=overwrite)

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
            raise ValueError(f"Expected RGB tiles of shape (B, 3, H, W) or (B, H, W, 3), found {tuple(rgb.shape)}.")
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
            expr = expr.reshape(expr.shape[0], c.expr_size, c.expr_size, c.n_genes).permute(0, 3, 1, 2)
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
            raise ValueError(f"`res` needs 1 or {batch} values (µm/px per tile), found {r.numel()}.")
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
            mask = torch.rand(b, c.num_tokens, device=self.device, generator=generator) < c.mask_ratio
        mask = mask.to(self.device, torch.bool)
        if mask.shape != (b, c.num_tokens):
            raise ValueError(f"`mask` must have shape ({b}, {c.num_tokens}), found {tuple(mask.shape)}.")
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

    def forward_all(self, rgb: torch.Tensor, expr: torch.Tensor, res: ResLike = None) -> torch.Tensor:
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

    def forward_rgb_to_expr(self, rgb: torch.Tensor, res: ResLike = None, *, genes: GenesLike = None) -> torch.Tensor:
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
