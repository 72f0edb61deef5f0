"""Official SQUALL checkpoints: reading ``.pth`` files safely, unwrapping them, inferring the architecture.

Also resolves ``hf://`` addresses. Nothing here builds a model: :mod:`squall_sd.models._factory` does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from squall_sd.models._config import SquallConfig, get_config

__all__ = [
    "CheckpointError",
    "OFFICIAL_SUFFIXES",
    "check_keys",
    "config_from_state_dict",
    "extract_state_dict",
    "read_official",
    "resolve_hf",
    "torch_load_checkpoint",
]

#: File suffixes read as official (PyTorch) checkpoints.
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the architecture."""


def check_keys(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys of ``state``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return

    def _fmt(items: list[str]) -> str:
        shown = "\n    ".join(items[:15])
        more = f"\n    ... and {len(items) - 15} more" if len(items) > 15 else ""
        return shown + more

    parts = [f"The checkpoint {source} does not match the SQUALL architecture:"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s):\n    {_fmt(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s):\n    {_fmt(unexpected)}")
    if wrong:
        parts.append(f"  {len(wrong)} shape mismatch(es):\n    {_fmt(wrong)}")
    raise CheckpointError("\n".join(parts))


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap an official SQUALL checkpoint container into a plain state dict.

    Accepts, in this order, a dict with ``base_model`` (training format), ``state_dict``,
    ``model``, or a bare state dict; strips a leading ``module.`` from the keys.

    Parameters
    ----------
    obj
        The object returned by :func:`torch.load`.
    source
        Name used in error messages.

    Returns
    -------
    Key → tensor.

    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"The {source} holds a {type(obj).__name__}, not a state dict.")
    for key in ("base_model", "state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"The {source} entry {k!r} is a {type(v).__name__}, not a tensor; expected a "
                "state dict "
                "(optionally inside 'base_model', 'state_dict' or 'model')."
            )
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    if not out:
        raise CheckpointError(f"The {source} state dict is empty.")
    return out


_BLOCK_RE = re.compile(r"^encoder\.blocks\.blocks\.(\d+)\.norm\.weight$")
_MW_RE = re.compile(r"^encoder\.blocks\.blocks\.(\d+)\.mlp\.mlp_rgb\.fc1\.weight$")
_DEC_RE = re.compile(r"^decoder\.decoder_rgb\.blocks\.(\d+)\.norm1\.weight$")


def config_from_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    img_size: int = 224,
    name: str | None = None,
    **overrides: Any,
) -> SquallConfig:
    """Infer the architecture from the tensor shapes of a SQUALL state dict.

    Parameters
    ----------
    state
        State dict in the published layout (``encoder.*`` / ``decoder.*`` keys).
    img_size
        RGB tile size in px (not stored in the weights; 224 in the published model).
    name
        Name of the configuration; default ``"squall-555m"`` if the layout equals it, else
        ``"squall-custom"``.
    **overrides
        Further non-architectural fields (e.g. ``mpp=4.0``).

    Returns
    -------
    The configuration.

    """
    if not any(k.startswith("encoder.") for k in state):
        if "patch_embed_rgb.proj.weight" in state or "blocks.blocks.0.norm.weight" in state:
            raise CheckpointError(
                "This is a backbone-only (fine-tuning) state dict without the 'encoder.' prefix "
                "and without "
                "decoders; load the full pretraining checkpoint (e.g. SQUALL_full.pth) instead."
            )
        sample = list(state)[:5]
        raise CheckpointError(f"No 'encoder.*' keys found; this is not a SQUALL checkpoint (keys start with {sample}).")
    if any("lookup_table" in k for k in state):
        raise CheckpointError(
            "The checkpoint holds 'lookup_table_*' relative-position tensors of an older SQUALL "
            "variant; "
            "the published configuration uses an MLP relative position bias. This is the wrong "
            "model."
        )
    need = [
        "encoder.patch_embed_rgb.proj.weight",
        "encoder.patch_embed_expr.0.weight",
        "encoder.patch_embed_expr.1.proj.weight",
        "encoder.blocks.blocks.0.attn.relative_position_bias.mlp.2.weight",
        "encoder.blocks.blocks.0.attn.relative_position_bias.mlp.0.weight",
    ]
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"Cannot infer the architecture: missing key(s) {absent}.")
    dim, _, patch, _ = state["encoder.patch_embed_rgb.proj.weight"].shape
    inner, n_genes = state["encoder.patch_embed_expr.0.weight"].shape[:2]
    factor = state["encoder.patch_embed_expr.1.proj.weight"].shape[-1]
    heads = state["encoder.blocks.blocks.0.attn.relative_position_bias.mlp.2.weight"].shape[0]
    rpb_hidden = state["encoder.blocks.blocks.0.attn.relative_position_bias.mlp.0.weight"].shape[0]
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k)))
    mw = [int(m.group(1)) for k in state if (m := _MW_RE.match(k))]
    merge = 1 + max(mw) if mw else 0
    dec = [int(m.group(1)) for k in state if (m := _DEC_RE.match(k))]
    decoder_depth = 1 + max(dec) if dec else 0
    fc1 = state.get(
        "encoder.blocks.blocks.0.mlp.mlp_rgb.fc1.weight",
        state.get("encoder.blocks.blocks.0.mlp.mlp.fc1.weight"),
    )
    hidden = fc1.shape[0] if fc1 is not None else 4 * dim
    if inner * factor != dim:
        raise CheckpointError(
            f"Unsupported layout: gene-embedding width {inner} × expression patch {factor} != token width {dim}."
        )
    if img_size % patch:
        raise CheckpointError(f"img_size {img_size} is not a multiple of the patch size {patch}.")
    cfg = get_config("squall-555m")
    cfg = cfg.replace(
        name=name or "squall-custom",
        img_size=int(img_size),
        patch_size=int(patch),
        expr_size=int(img_size // patch * factor),
        n_genes=int(n_genes),
        embed_dim=int(dim),
        depth=int(depth),
        merge_layer_depth=int(merge),
        num_heads=int(heads),
        mlp_ratio=float(hidden) / float(dim),
        decoder_depth=int(decoder_depth),
        rpb_hidden=int(rpb_hidden),
        qkv_bias="encoder.blocks.blocks.0.attn.qkv.bias" in state,
        description="architecture inferred from an official SQUALL checkpoint",
        **overrides,
    )
    if name is None:
        ref = get_config("squall-555m")
        arch = (
            "img_size",
            "patch_size",
            "expr_size",
            "n_genes",
            "embed_dim",
            "depth",
            "merge_layer_depth",
            "num_heads",
            "mlp_ratio",
            "decoder_depth",
            "rpb_hidden",
            "qkv_bias",
        )
        if all(getattr(cfg, a) == getattr(ref, a) for a in arch):
            cfg = cfg.replace(name="squall-555m", description=ref.description, licence=ref.licence)
    return cfg


def torch_load_checkpoint(path: Path, *, trust_checkpoint: bool) -> Any:
    """:func:`torch.load` a checkpoint on the CPU, tensors only unless ``trust_checkpoint``.

    Tries a memory-mapped read first; a file that cannot be read raises :class:`CheckpointError`.
    """
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty.")
    errors = []
    for kwargs in ({"mmap": True}, {}):
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint, **kwargs)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
            errors.append(err)
    err = errors[-1]
    hint = ""
    if "weights_only" in str(err) or "Unsupported global" in str(err):
        hint = (
            " The file holds Python objects besides tensors (e.g. a training-format checkpoint); "
            "if you trust "
            "its origin, pass trust_checkpoint=True."
        )
    raise CheckpointError(
        f"Could not read the checkpoint {path} (truncated, corrupt, or not a PyTorch file): "
        f"{type(err).__name__}: {err}.{hint}"
    ) from err


def read_official(
    path: Path, *, trust_checkpoint: bool, img_size: int, mpp: float | None
) -> tuple[SquallConfig, dict[str, torch.Tensor]]:
    """Read an official checkpoint: its configuration (inferred from the shapes) and state dict.

    Parameters
    ----------
    path
        The ``.pth`` (or other PyTorch) file.
    trust_checkpoint
        Allow arbitrary pickled objects (``torch.load(weights_only=False)``).
    img_size
        Tile size (not stored in the checkpoint).
    mpp
        Default µm/px to record in the configuration (``None``: that of ``squall-555m``).

    Returns
    -------
    ``(config, state)``.

    """
    obj = torch_load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    state = extract_state_dict(obj, source=f"checkpoint {path}")
    overrides = {} if mpp is None else {"mpp": float(mpp)}
    cfg = config_from_state_dict(state, img_size=img_size, **overrides)
    return cfg, state


def resolve_hf(uri: str, hub_kwargs: Mapping[str, Any], *, folder_files: Sequence[str]) -> Path:
    """Download ``hf://owner/repo/file`` (one file) or ``hf://owner/repo`` (a model folder).

    Parameters
    ----------
    uri
        The address.
    hub_kwargs
        Extra arguments for :mod:`huggingface_hub`.
    folder_files
        Files of a model folder to download for ``hf://owner/repo``.

    Returns
    -------
    The local file or folder.

    """
    spec = uri[len("hf://") :].strip("/")
    parts = spec.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"Expected 'hf://owner/repo' or 'hf://owner/repo/path/to/file', found {uri!r}.")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:])
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError(
            "Loading from the Hugging Face Hub needs `huggingface_hub`: pip install 'squall-sd[hub]'."
        ) from err
    if filename:
        return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, **hub_kwargs))
    patterns = list(folder_files)
    return Path(huggingface_hub.snapshot_download(repo_id=repo_id, allow_patterns=patterns, **hub_kwargs))
