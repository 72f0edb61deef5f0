"""Building blocks of the SQUALL architecture (plain PyTorch, no timm).

Attribute names and registration order follow the published state-dict layout exactly (see the
manifest in ``tests/models/data/squall_555m_state_dict.json``); do not rename or reorder them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "Block",
    "DecoderStack",
    "DropPath",
    "LinearShuffle",
    "Mlp",
    "MultiWayBlock",
    "MultiWayEncoder",
    "MultiWayMLP",
    "ConvStem",
    "PatchEmbed",
    "PositionEmbeddingMLP",
    "RelativePositionBias",
    "Route",
    "rpb_offsets",
]

#: MLP routing of the MultiWay blocks: ``"rgb"``, ``"expr"``, an ``int`` n (first n tokens RGB, rest
#: expression: the ``forward_all`` split) or a bool tensor (B, N), True = RGB (pretraining mask).
Route = str | int | torch.Tensor

_OFFSET_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def rpb_offsets(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Signed token offsets fed to the relative-position-bias MLP, exactly as published.

    ``g = floor(sqrt(n))``; positions ``0 .. n - g*g - 1`` sit at (0, 0) and the remaining ``g*g``
    positions are laid out row-major on a ``g`` × ``g`` grid. The result holds
    ``(x_i - x_j, y_i - y_j)`` (column difference first) in token units, not scaled by µm/px.

    Parameters
    ----------
    n
        Sequence length.
    device
        Device of the returned tensor.

    Returns
    -------
    Float32 tensor of shape (n, n, 2).

    """
    device = torch.device(device)
    key = (int(n), str(device))
    cached = _OFFSET_CACHE.get(key)
    if cached is not None:
        return cached
    # built outside inference mode so that a cached tensor can be reused by a later training step
    with torch.inference_mode(False), torch.no_grad():
        g = math.isqrt(n)
        extra = n - g * g
        k = torch.arange(g * g, device=device)
        x = torch.cat([torch.zeros(extra, dtype=torch.long, device=device), k % g])
        y = torch.cat([torch.zeros(extra, dtype=torch.long, device=device), k // g])
        offsets = torch.stack([x[:, None] - x[None, :], y[:, None] - y[None, :]], dim=-1).float()
    if device.type != "meta":
        _OFFSET_CACHE[key] = offsets
    return offsets


def _linspace(stop: float, n: int) -> list[float]:
    """``torch.linspace(0, stop, n).tolist()`` without a tensor (works under a meta device)."""
    if n <= 0:
        return []
    if n == 1:
        return [0.0]
    return [stop * i / (n - 1) for i in range(n)]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:  # noqa: D102
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding (a strided convolution), flattened row-major to tokens."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"Expected input of spatial size {self.img_size}×{self.img_size}, found "
                f"{tuple(x.shape[-2:])}; cut tiles of exactly this size."
            )
        # contiguous (B, N, D): otherwise every residual add keeps the conv's (B, D, N) strides and each
        # LayerNorm / Linear of every block copies its input back to row-major
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class ConvStem(nn.Module):
    """Convolutional stem: ``log2(patch_size)`` 3×3 stride-2 convolutions, then a 1×1 projection.

    A drop-in replacement of :class:`PatchEmbed` with the same token grid (one token per
    ``patch_size`` px) for small-data models: early convolutions make ViTs optimise and generalise
    far better when trained from scratch on little data (Xiao et al., *Early convolutions help
    transformers see better*, NeurIPS 2021). Channels double from ``embed_dim / 2**(n-1)`` up to
    ``embed_dim``; each 3×3 convolution is followed by BatchNorm and ReLU. The final 1×1
    convolution is named ``proj`` like the patchify projection.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        n = int(patch_size).bit_length() - 1
        if patch_size < 2 or 2**n != patch_size:
            raise ValueError(f"The convolutional stem needs a power-of-two patch_size >= 2, found {patch_size}.")
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        widths = [max(8, embed_dim // 2 ** (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"Expected input of spatial size {self.img_size}×{self.img_size}, found "
                f"{tuple(x.shape[-2:])}; cut tiles of exactly this size."
            )
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2).contiguous()


class PositionEmbeddingMLP(nn.Module):
    """Resolution-aware position embedding: ``LayerNorm(Linear((row·res, col·res)))`` per token."""

    def __init__(self, grid: int, embed_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.grid = int(grid)
        self.pos_embed = nn.Sequential(nn.Linear(2, embed_dim), nn.LayerNorm(embed_dim, eps=eps))

    def forward(self, res: torch.Tensor) -> torch.Tensor:
        """Return the (B, grid², D) position embedding for per-sample µm/px ``res`` (B,)."""
        g = self.grid
        w = self.pos_embed[0].weight
        idx = torch.arange(g * g, device=w.device)
        rc = torch.stack([idx // g, idx % g], dim=-1).to(torch.float32)  # (row, col)
        coords = rc[None] * res.to(device=w.device, dtype=torch.float32).reshape(-1, 1, 1)
        return self.pos_embed(coords.to(w.dtype))


class RelativePositionBias(nn.Module):
    """MLP relative position bias: offsets (2) → hidden (ReLU) → one value per head."""

    def __init__(self, num_heads: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, num_heads))
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, n: int) -> torch.Tensor:
        """Return the additive attention bias (1, heads, n, n) for a sequence of length ``n``.

        Without gradients (inference) the bias is computed once and reused until the MLP's
        parameters change (they are keyed by storage and version counter), the sequence length,
        device, dtype or autocast state change.
        """
        w = self.mlp[0].weight
        key = None
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            dev = w.device.type
            key = (
                int(n),
                str(w.device),
                w.dtype,
                torch.is_inference_mode_enabled(),
                torch.is_autocast_enabled(dev) if dev in ("cuda", "cpu") else False,
                torch.get_autocast_dtype(dev) if dev in ("cuda", "cpu") else None,
                tuple((p.data_ptr(), p._version) for p in self.mlp.parameters()),
            )
            cached = self._bias_cache
            if cached is not None and cached[0] == key:
                return cached[1]
        offsets = rpb_offsets(n, w.device).to(w.dtype)
        bias = self.mlp(offsets).permute(2, 0, 1).unsqueeze(0).contiguous()
        if key is not None:
            self._bias_cache = (key, bias)
        else:
            self._bias_cache = None
        return bias


class Attention(nn.Module):
    """Multi-head self-attention with the MLP relative position bias, via SDPA."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False, rpb_hidden: int = 64) -> None:
        super().__init__()
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias = RelativePositionBias(num_heads, rpb_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # (1, heads, n, n), broadcast over the batch by SDPA (expanding it to B would copy it)
        bias = self.relative_position_bias(n).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Two-layer MLP with exact-erf GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc2(self.act(self.fc1(x)))


class MultiWayMLP(nn.Module):
    """Modality-routed MLP (``mlp_rgb``/``mlp_expr`` with their norms) or one shared MLP."""

    def __init__(self, dim: int, hidden: int, *, multiway: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.multiway = bool(multiway)
        if self.multiway:
            self.mlp_rgb = Mlp(dim, hidden)
            self.mlp_expr = Mlp(dim, hidden)
            self.norm_rgb = nn.LayerNorm(dim, eps=eps)
            self.norm_expr = nn.LayerNorm(dim, eps=eps)
        else:
            self.mlp = Mlp(dim, hidden)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def _rgb(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_rgb(self.norm_rgb(x))

    def _expr(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_expr(self.norm_expr(x))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Apply the MLP(s) to ``x`` (B, N, D) with the given routing (see :data:`Route`)."""
        if not self.multiway:
            return self.mlp(self.norm(x))
        if isinstance(route, str):
            if route == "rgb":
                return self._rgb(x)
            if route == "expr":
                return self._expr(x)
            raise ValueError(f"Unknown route {route!r}; expected 'rgb', 'expr', an int or a bool mask.")
        if isinstance(route, int):
            return torch.cat([self._rgb(x[:, :route]), self._expr(x[:, route:])], dim=1)
        mask = route.to(device=x.device, dtype=torch.bool)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"Routing mask of shape {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}.")
        y_rgb = self._rgb(x[mask])
        y_expr = self._expr(x[~mask])
        out = x.new_empty(x.shape, dtype=torch.promote_types(y_rgb.dtype, y_expr.dtype))
        out[mask] = y_rgb.to(out.dtype)
        out[~mask] = y_expr.to(out.dtype)
        return out


class MultiWayBlock(nn.Module):
    """Encoder block: shared pre-norm attention, then the (routed) MLP with its own norm."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        *,
        multiway: bool,
        qkv_bias: bool = False,
        rpb_hidden: int = 64,
        drop_path: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rpb_hidden=rpb_hidden)
        self.mlp = MultiWayMLP(dim, hidden, multiway=multiway, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:  # noqa: D102
        x = x + self.drop_path(self.attn(self.norm(x)))
        return x + self.drop_path(self.mlp(x, route))


class MultiWayEncoder(nn.Module):
    """Stack of :class:`MultiWayBlock` followed by a final LayerNorm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        merge_layer_depth: int,
        num_heads: int,
        hidden: int,
        *,
        qkv_bias: bool = False,
        rpb_hidden: int = 64,
        drop_path_rate: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        dpr = _linspace(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            MultiWayBlock(
                dim,
                num_heads,
                hidden,
                multiway=i < merge_layer_depth,
                qkv_bias=qkv_bias,
                rpb_hidden=rpb_hidden,
                drop_path=dpr[i],
                eps=eps,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:  # noqa: D102
        for blk in self.blocks:
            x = blk(x, route)
        return self.norm(x)


class Block(nn.Module):
    """Plain pre-norm decoder block (registration order: norm1, norm2, mlp, attn)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        *,
        qkv_bias: bool = False,
        rpb_hidden: int = 64,
        drop_path: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rpb_hidden=rpb_hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DecoderStack(nn.Module):
    """``depth`` decoder :class:`Block` s and a final LayerNorm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        hidden: int,
        *,
        qkv_bias: bool = False,
        rpb_hidden: int = 64,
        drop_path_rate: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        dpr = _linspace(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                hidden,
                qkv_bias=qkv_bias,
                rpb_hidden=rpb_hidden,
                drop_path=dpr[i],
                eps=eps,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class LinearShuffle(nn.Module):
    """Expression head: per-token ``fc1`` + ReLU, literal C-order reshape, per-cell ``fc2``.

    Output cell (y, x) with k = expr_size·y + x reads token ``k // f²`` and slice
    ``[inner·(k % f²), inner·(k % f² + 1))`` of that token's fc1 output (f = cells per token side),
    exactly as the published model does (a token fills a 1 × f² horizontal run, not an f × f block).
    """

    def __init__(self, dim: int, inner: int, factor: int, n_genes: int) -> None:
        super().__init__()
        self.inner = int(inner)
        self.factor = int(factor)
        self.fc1 = nn.Linear(dim, inner * factor * factor)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(inner, n_genes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-``fc2`` cell features (B, S, S, inner) from tokens (B, g², D), S = g·factor."""
        b, n, d = x.shape
        g = math.isqrt(n)
        h = self.act(self.fc1(x.reshape(b, g, g, d)))
        s = g * self.factor
        return h.reshape(b, s, s, self.inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expression grid (B, S, S, n_genes) from decoder tokens (B, g², D)."""
        return self.fc2(self.features(x))
