"""Model configurations (:class:`SquallConfig`) and the model registry."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["SquallConfig", "get_config", "list_configs", "register_config"]

#: Gene channels of the published SQUALL vocabulary (human-mouse one-to-one orthologs).
N_GENES_SQUALL = 15757

_REGISTRY: dict[str, SquallConfig] = {}


@dataclass(frozen=True)
class SquallConfig:
    """Architecture and preprocessing contract of a SQUALL model.

    The defaults are the published 555M layout (``squall-555m``). Geometry: an RGB tile of
    ``img_size`` px is cut into ``patch_size`` px patches (a ``grid`` × ``grid`` token grid); the
    expression grid is ``expr_size`` × ``expr_size`` cells per tile, so one cell covers
    ``img_size / expr_size`` px and one token ``expr_patch`` × ``expr_patch`` cells.

    Parameters
    ----------
    name
        Registry name of the configuration.
    img_size
        RGB tile size in pixels (square). The patch embedding rejects any other size.
    patch_size
        RGB patch size in pixels (``down_sample`` in the official config).
    expr_size
        Expression grid size in cells per tile side.
    n_genes
        Number of gene channels (``expr_chans``); set from ``genes`` when that is given.
    genes
        Gene symbols in channel order, or ``None`` when the vocabulary is supplied separately (the
        555M model: the official gene-order file, see :func:`squall_sd.models.read_gene_order`).
    embed_dim
        Token width.
    depth
        Number of encoder (MultiWay) blocks.
    merge_layer_depth
        Blocks ``0 .. merge_layer_depth - 1`` have one MLP per modality, the rest a shared MLP.
    num_heads
        Attention heads (encoder and decoders).
    mlp_ratio
        Hidden width of every transformer MLP relative to ``embed_dim``.
    decoder_depth
        Blocks in each of the two decoders.
    rpb_hidden
        Hidden width of the relative-position-bias MLP.
    qkv_bias
        Whether the qkv projections have a bias (``False`` in the published model).
    norm_eps
        LayerNorm epsilon (PyTorch default 1e-5 in the published model).
    drop_path_rate
        Stochastic depth, linear from 0 to this value over the encoder and over each decoder.
    mask_ratio
        Probability that a token carries the RGB embedding in pretraining.
    mpp
        Default micrometres per pixel of the input tiles (the model's ``res`` input).
    effective_mpp
        The optical resolution the model was trained at, in µm per pixel, when it is coarser than
        ``mpp`` (``None``: as sharp as ``mpp`` allows). A model trained on soft scans (e.g. her2st
        copies at 3.2 µm/px read at 2 µm/px) sees sharper detail in a 0.5 µm/px scan read at the same
        ``mpp``; with ``effective_mpp`` set, tiles cut from images sharper than it are degraded to
        it (box-averaged to ``effective_mpp`` and bilinearly resampled back to ``mpp``,
        :func:`squall_sd.pp.degrade_patches`) before the model sees them, in training
        (``data.effective_mpp``) and in :func:`~squall_sd.tl.predict_expression` /
        :func:`~squall_sd.tl.embed` alike.
    input_range
        Input normalisation contract: ``"0-1"`` means RGB divided by 255, no mean/std.
    init
        Weight initialisation for training from scratch: ``"squall"`` (normal with mean 0.02 and
        std 0.01 for every Linear/Conv weight, zero biases, as in the published pretraining) or
        ``"trunc_normal"`` (truncated normal, std 0.02, as in the fine-tuning classes).
    stem
        RGB patch embedding: ``"patchify"`` (one strided ``patch_size`` convolution, the published
        layout) or ``"conv"`` (:class:`~squall_sd.models._layers.ConvStem`: a stack of 3×3 stride-2
        convolutions with BatchNorm, for small models trained from scratch on little data).
    region_reduce
        How a region's value (a spot, bin or cell) is formed from the model's grid cells, the
        default of ``reduce`` in :meth:`Squall.predict` and :func:`squall_sd.tl.predict_expression`:
        ``"sum"`` for the published binary target (each cell holds the region's vector divided by the
        region's cell count, so the region's vector is the sum), ``"mean"`` for models fine-tuned on
        region means (e.g. ``squall-tiny-her2st``, whose cells each predict the spot's log1p(CP10k)).
    description
        Free text.
    licence
        Licence of weights distributed for this configuration, if any.

    """

    name: str = "squall-555m"
    img_size: int = 224
    patch_size: int = 16
    expr_size: int = 56
    n_genes: int = N_GENES_SQUALL
    genes: tuple[str, ...] | None = None
    embed_dim: int = 1024
    depth: int = 24
    merge_layer_depth: int = 16
    num_heads: int = 16
    mlp_ratio: float = 4.0
    decoder_depth: int = 4
    rpb_hidden: int = 64
    qkv_bias: bool = False
    norm_eps: float = 1e-5
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.5
    mpp: float = 0.5
    effective_mpp: float | None = None
    input_range: Literal["0-1"] = "0-1"
    init: Literal["squall", "trunc_normal"] = "squall"
    stem: Literal["patchify", "conv"] = "patchify"
    region_reduce: Literal["sum", "mean"] = "sum"
    description: str = ""
    licence: str = ""

    def __post_init__(self) -> None:
        if self.genes is not None:
            genes = tuple(str(g) for g in self.genes)
            if len(set(genes)) != len(genes):
                dup = sorted({g for g in genes if genes.count(g) > 1})[:10]
                raise ValueError(f"`genes` contains duplicate symbols, e.g. {dup}.")
            object.__setattr__(self, "genes", genes)
            object.__setattr__(self, "n_genes", len(genes))
        for key in (
            "img_size",
            "patch_size",
            "expr_size",
            "n_genes",
            "embed_dim",
            "depth",
            "num_heads",
        ):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"Expected `{key}` to be positive, found `{getattr(self, key)}`.")
        if self.img_size % self.patch_size:
            raise ValueError(f"`img_size` ({self.img_size}) must be a multiple of `patch_size` ({self.patch_size}).")
        if (self.expr_size * self.patch_size) % self.img_size:
            raise ValueError(
                f"`expr_size` ({self.expr_size}) must give a whole number of expression cells per "
                f"token: expr_size * patch_size / img_size = "
                f"{self.expr_size * self.patch_size / self.img_size}."
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"`embed_dim` ({self.embed_dim}) must be divisible by `num_heads` ({self.num_heads}).")
        if self.embed_dim % self.expr_patch:
            raise ValueError(f"`embed_dim` ({self.embed_dim}) must be divisible by `expr_patch` ({self.expr_patch}).")
        if not 0 <= self.merge_layer_depth <= self.depth:
            raise ValueError(
                f"`merge_layer_depth` must lie in [0, depth={self.depth}], found {self.merge_layer_depth}."
            )
        if self.effective_mpp is not None:
            eff = float(self.effective_mpp)
            if not eff > float(self.mpp):
                raise ValueError(
                    f"`effective_mpp` ({self.effective_mpp}) must be coarser than `mpp` ({self.mpp}) µm/px, "
                    "or None for a model trained on images as sharp as `mpp`."
                )
            object.__setattr__(self, "effective_mpp", eff)
        if self.input_range != "0-1":
            raise ValueError(f"Only input_range='0-1' is supported, found {self.input_range!r}.")
        if self.stem not in ("patchify", "conv"):
            raise ValueError(f"`stem` must be 'patchify' or 'conv', found {self.stem!r}.")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(
                f"stem='conv' halves the resolution per convolution, so it needs a power-of-two "
                f"`patch_size` >= 2, found {self.patch_size}; use stem='patchify' for this size."
            )
        if self.init not in ("squall", "trunc_normal"):
            raise ValueError(f"`init` must be 'squall' or 'trunc_normal', found {self.init!r}.")

    # derived sizes -------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Tokens per tile side (``img_size // patch_size``)."""
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per tile (``grid**2``)."""
        return self.grid**2

    @property
    def expr_patch(self) -> int:
        """Expression cells per token side (4 in the published model)."""
        return self.expr_size * self.patch_size // self.img_size

    @property
    def expr_embed_dim(self) -> int:
        """Width of the per-cell gene embedding (``embed_dim // expr_patch``, 256 published)."""
        return self.embed_dim // self.expr_patch

    @property
    def cell_px(self) -> float:
        """RGB pixels per expression cell side."""
        return self.img_size / self.expr_size

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the transformer MLPs."""
        return int(self.embed_dim * self.mlp_ratio)

    def replace(self, **overrides: Any) -> SquallConfig:
        """Return a copy with ``overrides`` applied (unknown keys raise :class:`TypeError`).

        Parameters
        ----------
        **overrides
            Field values to change, e.g. ``genes=["ERBB2", "CD74"]`` or ``depth=2``.

        Returns
        -------
        The new configuration.

        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Unknown SquallConfig field(s) {unknown}; valid fields are {sorted(names)}.")
        genes = overrides.get("genes")
        if genes is not None:
            if "n_genes" in overrides and int(overrides["n_genes"]) != len(genes):
                raise ValueError(f"`n_genes`={overrides['n_genes']} disagrees with len(genes)={len(genes)}.")
            overrides["n_genes"] = len(genes)
        elif "n_genes" in overrides and "genes" not in overrides and self.genes is not None:
            if int(overrides["n_genes"]) != len(self.genes):
                overrides["genes"] = None  # the old gene list no longer fits
        return dataclasses.replace(self, **overrides)

    def to_dict(self, *, include_genes: bool = False) -> dict[str, Any]:
        """Return the configuration as a JSON-serialisable dict.

        Parameters
        ----------
        include_genes
            Include the gene list (it is stored in ``genes.txt`` by
            :meth:`~squall_sd.models.Squall.save_pretrained`).

        Returns
        -------
        Field name → value.

        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["genes"] = list(self.genes) if (include_genes and self.genes is not None) else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SquallConfig:
        """Build a configuration from :meth:`to_dict` output (unknown keys are logged and ignored).

        Parameters
        ----------
        data
            Field name → value.

        Returns
        -------
        The configuration.

        """
        from squall_sd._logging import logger

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.info("Ignoring unknown config keys %s", unknown)
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("genes") is not None:
            kwargs["genes"] = tuple(kwargs["genes"])
        return cls(**kwargs)


def register_config(config: SquallConfig, *, overwrite: bool = False) -> SquallConfig:
    """Register ``config`` under ``config.name``.

    Parameters
    ----------
    config
        The configuration.
    overwrite
        Replace an existing entry of the same name instead of raising.

    Returns
    -------
    The registered configuration.

    """
    if config.name in _REGISTRY and not overwrite:
        raise ValueError(f"A model named {config.name!r} is already registered; pass overwrite=True.")
    _REGISTRY[config.name] = config
    return config


def list_configs(pattern: str = "*") -> list[str]:
    """Names of the registered configurations matching the glob ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides: Any) -> SquallConfig:
    """Return the registered configuration ``name`` with ``overrides`` applied.

    Parameters
    ----------
    name
        Registered name (see :func:`squall_sd.models.list_models`).
    **overrides
        Field values to change.

    Returns
    -------
    The configuration.

    """
    if name not in _REGISTRY:
        raise KeyError(f"Model {name!r} not found; registered models are {list_configs()}.")
    cfg = _REGISTRY[name]
    return cfg.replace(**overrides) if overrides else cfg


register_config(
    SquallConfig(
        name="squall-555m",
        description="Published SQUALL layout: ViT-L MultiWay encoder (24 blocks, merge at 16), two "
        "4-block decoders, 15,757 gene channels; loads the official checkpoints strictly.",
        licence="official weights: CC BY-NC-ND 4.0 (not distributed; load your own download)",
    )
)
register_config(
    SquallConfig(
        name="squall-base",
        embed_dim=768,
        depth=12,
        merge_layer_depth=8,
        num_heads=12,
        decoder_depth=2,
        description="ViT-B-sized MultiWay encoder (12 blocks, merge at 8), 2-block decoders, full vocabulary.",
    )
)
register_config(
    SquallConfig(
        name="squall-small",
        embed_dim=384,
        depth=12,
        merge_layer_depth=8,
        num_heads=6,
        decoder_depth=2,
        description="ViT-S-sized MultiWay encoder (12 blocks, merge at 8), 2-block decoders, full vocabulary.",
    )
)
register_config(
    SquallConfig(
        name="squall-tiny",
        embed_dim=128,
        depth=4,
        merge_layer_depth=2,
        num_heads=4,
        decoder_depth=1,
        rpb_hidden=32,
        n_genes=256,
        drop_path_rate=0.0,
        description="Tiny model for tests and CPU demos (width 128, 4 blocks, 256 gene channels); "
        "pass genes=[...] to set the vocabulary.",
    )
)
