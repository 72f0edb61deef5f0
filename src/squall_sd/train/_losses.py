"""Training objectives: masked-image reconstruction, InfoNCE, Cox loss and MIL pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "empty_expression_token",
    "masked_image_loss",
    "info_nce",
    "cox_partial_likelihood",
    "GatedAttentionMIL",
]


def empty_expression_token(model: nn.Module) -> torch.Tensor:
    """Embedding (1, N, D) of an all-zero expression grid: the "no modality seen" token.

    The expression embedding of an empty grid reduces to the biases of the two expression
    convolutions, so it is computed without materialising a (G, S, S) grid.

    Parameters
    ----------
    model
        A :class:`~squall_sd.models.Squall`.

    Returns
    -------
    The token embedding, broadcastable over the batch.

    """
    c = model.config
    gene_conv, patch = model.encoder.patch_embed_expr[0], model.encoder.patch_embed_expr[1]
    h = gene_conv.bias.view(1, -1, 1, 1).expand(1, -1, c.expr_size, c.expr_size)
    return patch(h.contiguous())


def masked_image_loss(
    model: nn.Module,
    rgb: torch.Tensor,
    res: torch.Tensor,
    *,
    mask_ratio: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Image-only pretraining loss: reconstruct the pixels of hidden tokens through the RGB decoder.

    A share ``mask_ratio`` of the token positions of each tile is hidden. Hidden positions get the
    embedding of an empty expression grid (:func:`empty_expression_token`) instead of their RGB
    patch and are routed through the expression MLPs of the MultiWay blocks, exactly as a position
    that carries expression in the published complementary-masking objective (spec §4.7); visible
    positions carry their RGB patch. The encoding is decoded by ``decoder_expr`` +
    ``increase_dim_expr`` (the published RGB output path) and scored with SmoothL1 (β = 1) on the
    pixels of the hidden positions only. The objective is therefore the published one with every
    expression token replaced by "no expression measured", so phase-1 weights need no adaptation
    in phase 2.

    Parameters
    ----------
    model
        A :class:`~squall_sd.models.Squall`.
    rgb
        Tiles (B, 3, H, W), uint8 or float in [0, 1].
    res
        µm per pixel, (B,).
    mask_ratio
        Share of token positions to hide and reconstruct (0 < mask_ratio < 1).
    generator
        Random generator for the mask.

    Returns
    -------
    The scalar loss.

    """
    c = model.config
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), found {mask_ratio!r}.")
    x = model._prepare_rgb(rgb)
    b = x.shape[0]
    res = model._prepare_res(res, b)
    enc = model.encoder
    visible = torch.rand(b, c.num_tokens, device=x.device, generator=generator) >= float(mask_ratio)
    tokens = torch.where(
        visible[..., None], enc.embed_rgb(x), empty_expression_token(model).to(x.dtype)
    )
    z = enc.forward_tokens(tokens + enc.pos_embed(res), visible)
    pred = model.decoder.rgb(z)  # (B, H, W, 3)
    hidden = ~visible.reshape(b, c.grid, c.grid)
    px = hidden.repeat_interleave(c.patch_size, 1).repeat_interleave(c.patch_size, 2)
    if not px.any():
        return pred.sum() * 0.0
    target = x.permute(0, 2, 3, 1)
    return F.smooth_l1_loss(pred[px].float(), target[px].float(), beta=1.0)


def info_nce(z_rgb: torch.Tensor, z_expr: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Token-level InfoNCE between RGB and expression encodings (``Squall_contrast``, spec §5).

    *Inter*: for every token position, the RGB token of tile ``b`` must pick the expression token
    of the same tile among the batch; *intra*: within every tile, the RGB token of position ``k``
    must pick the expression token of position ``k`` among the tile's positions. Both directions
    (RGB→expression and expression→RGB) are averaged, and inter and intra are averaged.

    Parameters
    ----------
    z_rgb, z_expr
        Token encodings (B, N, D) of the same tiles.
    temperature
        Softmax temperature τ (0.1 published).

    Returns
    -------
    The scalar loss.

    """
    a = F.normalize(z_rgb.float(), dim=-1)
    e = F.normalize(z_expr.float(), dim=-1)
    b, n, _ = a.shape
    losses = []
    if b > 1:  # inter: per position, across the batch -> (N, B, B)
        logits = torch.einsum("bnd,cnd->nbc", a, e) / temperature
        tgt = torch.arange(b, device=a.device).expand(n, b)
        losses.append(
            0.5
            * (
                F.cross_entropy(logits.reshape(n * b, b), tgt.reshape(-1))
                + F.cross_entropy(logits.transpose(1, 2).reshape(n * b, b), tgt.reshape(-1))
            )
        )
    logits = torch.einsum("bnd,bmd->bnm", a, e) / temperature  # intra: (B, N, N)
    tgt = torch.arange(n, device=a.device).expand(b, n)
    losses.append(
        0.5
        * (
            F.cross_entropy(logits.reshape(b * n, n), tgt.reshape(-1))
            + F.cross_entropy(logits.transpose(1, 2).reshape(b * n, n), tgt.reshape(-1))
        )
    )
    return torch.stack(losses).mean()


def cox_partial_likelihood(
    risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor
) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    Parameters
    ----------
    risk
        Predicted log hazard ratios (n,); higher = earlier event.
    time
        Follow-up times (n,).
    event
        1 where the event was observed, 0 where censored (n,).

    Returns
    -------
    The scalar loss (0 when the batch has no event).

    """
    risk = risk.reshape(-1).float()
    order = torch.argsort(time.reshape(-1), descending=True)
    r, ev = risk[order], event.reshape(-1)[order].float()
    log_cum = torch.logcumsumexp(r, dim=0)  # log sum over {j : t_j >= t_i}
    n_ev = ev.sum()
    if n_ev <= 0:
        return risk.sum() * 0.0
    return -((r - log_cum) * ev).sum() / n_ev


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL pooling (Ilse et al. 2018; the ``ABMIL`` aggregator, spec §6.2).

    ``h = Dropout(ReLU(W_in x))``, ``a = w_c · (tanh(W_a h) ⊙ σ(W_b h))``, softmax over the tiles of
    a
    slide, ``bag = Σ softmax(a) h``, ``out = classifier(bag)``.

    Parameters
    ----------
    in_dim
        Tile-embedding width.
    hidden_dim
        Width of the transformed tile features (the attention branches use half of it).
    n_outputs
        Outputs per slide (1 for a Cox risk or a binary logit).
    dropout
        Dropout after the input layer and inside the attention branches.

    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 256, n_outputs: int = 1, dropout: float = 0.25
    ) -> None:
        super().__init__()
        att = max(1, hidden_dim // 2)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_a = nn.Sequential(nn.Linear(hidden_dim, att), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(
            nn.Linear(hidden_dim, att), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.attention_c = nn.Linear(att, 1)
        self.classifier = nn.Linear(hidden_dim, n_outputs)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool bags of tile embeddings.

        Parameters
        ----------
        x
            (B, T, in_dim) tile embeddings (padded).
        mask
            (B, T) bool, True for real tiles.

        Returns
        -------
        ``(out, attention)``: (B, n_outputs) and the (B, T) attention weights.

        """
        h = self.fc(x)
        a = self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        w = torch.softmax(a, dim=1)
        bag = torch.einsum("bt,btd->bd", w, h)
        return self.classifier(bag), w
