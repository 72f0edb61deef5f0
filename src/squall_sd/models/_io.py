"""Model creation, saving and loading (squall-sd folders, official SQUALL ``.pth``, HF Hub)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from squall_sd._logging import logger
from squall_sd.models._config import SquallConfig, get_config, list_configs
from squall_sd.models._genes import GeneVocabulary
from squall_sd.models._squall import Squall

__all__ = [
    "CheckpointError",
    "config_from_state_dict",
    "create",
    "extract_state_dict",
    "list_models",
    "load",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHA_NAME = "model.safetensors.sha256"
GENES_NAME = "genes.txt"
GENES_TSV_NAME = "genes.tsv"
FORMAT = "squall-sd"
FORMAT_VERSION = 1
_OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: Folder with bundled weights, one sub-folder per model name (config.json + model.safetensors).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the architecture."""


# ----------------------------------------------------------------------------------------------
# registry front end
# ----------------------------------------------------------------------------------------------
def _bundled() -> dict[str, Path]:
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(WEIGHTS_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Names of the registered models.

    Parameters
    ----------
    pattern
        Glob pattern on the name, e.g. ``"squall-t*"``.
    pretrained
        List only names with bundled weights (loadable with :func:`load`).

    Returns
    -------
    Sorted model names.

    """
    names = set(_bundled())
    if not pretrained:
        names |= set(list_configs())
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def create(name: str | SquallConfig, **overrides: Any) -> Squall:
    """Create a model with freshly initialised weights.

    Parameters
    ----------
    name
        A registered configuration name (see :func:`list_models`) or a :class:`SquallConfig`.
    **overrides
        Configuration fields to change, e.g. ``genes=["ERBB2", "CD74"]``, ``depth=2``,
        ``drop_path_rate=0``.

    Returns
    -------
    The model (in training mode, on the default device; build under ``torch.device("meta")`` to get
    a model without memory).

    Examples
    --------
    >>> import squall_sd as squall
    >>> model = squall.models.create("squall-tiny", genes=["ERBB2", "CD74", "EPCAM"])
    >>> model.n_genes
    3

    """
    if isinstance(name, SquallConfig):
        cfg = name.replace(**overrides) if overrides else name
    else:
        if name not in list_configs() and name in _bundled():
            cfg_dict = json.loads((_bundled()[name] / CONFIG_NAME).read_text())["config"]
            cfg = SquallConfig.from_dict(cfg_dict).replace(**overrides)
        else:
            cfg = get_config(name, **overrides)
    return Squall(cfg)


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------
def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_pretrained(
    model: Squall, directory: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``config.json``, ``model.safetensors``, its ``.sha256`` and the genes to a directory.

    Parameters
    ----------
    model
        The model.
    directory
        Output directory (created if needed).
    overwrite
        Replace an existing model in ``directory`` instead of raising :class:`FileExistsError`.

    Returns
    -------
    The directory.

    """
    from safetensors.torch import save_file

    from squall_sd import __version__

    directory = Path(directory).expanduser()
    if (directory / WEIGHTS_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"{directory / WEIGHTS_NAME} exists; pass overwrite=True to replace it."
        )
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": f"squall-sd {__version__}"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    sha = _sha256(directory / WEIGHTS_NAME)
    (directory / SHA_NAME).write_text(f"{sha}  {WEIGHTS_NAME}\n")
    vocab = model.vocabulary
    if vocab is not None:
        vocab.write(directory / GENES_NAME)
        if vocab.ensembl_ids is not None or vocab.has_mouse:
            vocab.write(directory / GENES_TSV_NAME)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "Squall",
        "config": model.config.to_dict(include_genes=False),
        "genes_file": None
        if vocab is None
        else (GENES_TSV_NAME if (directory / GENES_TSV_NAME).exists() else GENES_NAME),
        "gene_source": None if vocab is None else vocab.source,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha,
        "squall_sd_version": __version__,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    model.weights_sha256 = sha
    logger.info("Saved model %r to %s (sha256 %s)", model.config.name, directory, sha[:12])
    return directory


# ----------------------------------------------------------------------------------------------
# state-dict checks
# ----------------------------------------------------------------------------------------------
def _check_keys(
    expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], source: str
) -> None:
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
        raise CheckpointError(
            "No 'encoder.*' keys found; this is not a SQUALL checkpoint (keys start with "
            f"{sample})."
        )
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
            f"Unsupported layout: gene-embedding width {inner} × expression patch {factor} != "
            f"token width {dim}."
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


def _instantiate(
    cfg: SquallConfig, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype
) -> Squall:
    with torch.device("meta"):
        model = Squall(cfg, init_weights=False)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(expected, state, source)
    # copy into fresh (aligned) memory: tensors of a memory-mapped file are not aligned the way
    # freshly allocated ones are, which changes BLAS summation order in the last bits
    state = {
        k: v.to(dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _read_vocab(
    genes_file: str | os.PathLike[str] | None, n: int, gene_order: str
) -> GeneVocabulary | None:
    if genes_file is None:
        return None
    vocab = GeneVocabulary.from_file(genes_file, order=gene_order)  # type: ignore[arg-type]
    if len(vocab) != n:
        raise ValueError(
            f"The gene-order file {genes_file} lists {len(vocab)} genes, but the weights have {n} "
            "channels."
        )
    return vocab


def _load_directory(
    directory: Path,
    *,
    genes_file: Any,
    map_location: Any,
    gene_order: str,
    dtype: torch.dtype,
    verify: bool,
) -> Squall:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a squall-sd model directory (no {CONFIG_NAME}); save models with "
            "`model.save_pretrained(dir)`, or pass the official .pth file."
        )
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = SquallConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{cfg_path} is not a valid squall-sd config: {err}") from err
    weights = directory / meta.get("weights_file", WEIGHTS_NAME)
    if not weights.is_file():
        raise FileNotFoundError(f"Weights file {weights} is missing.")
    expected_sha = meta.get("weights_sha256")
    if (directory / SHA_NAME).is_file():
        expected_sha = (directory / SHA_NAME).read_text().split()[0]
    sha = _sha256(weights) if (verify or expected_sha is None) else expected_sha
    if verify and expected_sha and sha != expected_sha:
        raise CheckpointError(
            f"sha256 of {weights} is {sha} but {expected_sha} was recorded: the file is corrupt "
            "or was "
            "replaced. Re-download or re-save the model."
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"Could not read {weights} (truncated or not a safetensors file): {err}"
        ) from err
    if genes_file is not None:
        vocab = _read_vocab(genes_file, cfg.n_genes, gene_order)
    elif meta.get("genes_file") and (directory / meta["genes_file"]).is_file():
        vocab = _read_vocab(directory / meta["genes_file"], cfg.n_genes, gene_order)
    elif (directory / GENES_NAME).is_file():
        vocab = _read_vocab(directory / GENES_NAME, cfg.n_genes, gene_order)
    else:
        vocab = None
    model = _instantiate(cfg.replace(genes=None), state, str(weights), dtype)
    if vocab is not None:
        model.set_vocabulary(vocab)
    model.weights_sha256 = sha
    model.weights_source = str(directory)
    return model.to(map_location)


def _torch_load(path: Path, *, trust_checkpoint: bool) -> Any:
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


def _load_official(
    path: Path,
    *,
    genes_file: Any,
    map_location: Any,
    gene_order: str,
    dtype: torch.dtype,
    trust_checkpoint: bool,
    img_size: int,
    mpp: float | None,
) -> Squall:
    obj = _torch_load(path, trust_checkpoint=trust_checkpoint)
    state = extract_state_dict(obj, source=f"checkpoint {path}")
    overrides = {} if mpp is None else {"mpp": float(mpp)}
    cfg = config_from_state_dict(state, img_size=img_size, **overrides)
    vocab = _read_vocab(genes_file, cfg.n_genes, gene_order)
    model = _instantiate(cfg, state, str(path), dtype)
    if vocab is None:
        logger.warning(
            "Loaded %s without a gene-order file: output channels are unnamed (0..%d). Pass "
            "genes_file='gene_token_homologs.csv' to name them.",
            path.name,
            cfg.n_genes - 1,
        )
    if vocab is not None:
        model.set_vocabulary(vocab)
    model.weights_sha256 = _sha256(path)
    model.weights_source = str(path)
    return model.to(map_location)


def _resolve_hf(uri: str, hub_kwargs: Mapping[str, Any]) -> Path:
    spec = uri[len("hf://") :].strip("/")
    parts = spec.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(
            f"Expected 'hf://owner/repo' or 'hf://owner/repo/path/to/file', found {uri!r}."
        )
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:])
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError(
            "Loading from the Hugging Face Hub needs `huggingface_hub`: pip install "
            "'squall-sd[hub]'."
        ) from err
    if filename:
        return Path(
            huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, **hub_kwargs)
        )
    patterns = [CONFIG_NAME, WEIGHTS_NAME, SHA_NAME, GENES_NAME, GENES_TSV_NAME]
    return Path(
        huggingface_hub.snapshot_download(repo_id=repo_id, allow_patterns=patterns, **hub_kwargs)
    )


def load(
    name_or_path: str | os.PathLike[str],
    *,
    genes_file: str | os.PathLike[str] | None = None,
    map_location: str | torch.device = "cpu",
    gene_order: Literal["first_column", "row"] = "first_column",
    dtype: torch.dtype = torch.float32,
    trust_checkpoint: bool = False,
    verify: bool = True,
    img_size: int = 224,
    mpp: float | None = None,
    hub_kwargs: Mapping[str, Any] | None = None,
) -> Squall:
    """Load a model with weights.

    Parameters
    ----------
    name_or_path
        One of

        - a bundled model name (see ``list_models(pretrained=True)``);
        - a squall-sd model directory (``config.json`` + ``model.safetensors``);
        - an official SQUALL checkpoint (``SQUALL_full.pth``, ``SQUALL_lowres.pth``, ...): every
          published container layout (``base_model`` / ``state_dict`` / ``model`` / bare state dict,
          optional ``module.`` prefix) is accepted and loaded strictly, the architecture is inferred
          from the tensor shapes;
        - ``"hf://owner/repo/file.pth"`` or ``"hf://owner/repo"`` (a squall-sd directory on the
          Hub), downloaded with :mod:`huggingface_hub` (the ``hub`` extra).
    genes_file
        Gene-order file naming the channels: the official ``gene_token_homologs.csv``, or a
        ``genes.txt`` / ``genes.tsv``. Overrides the genes stored with a squall-sd directory.
    map_location
        Device to put the model on.
    gene_order
        Channel order of the official CSV: ``"first_column"`` (default, as the authors' analyses)
        or ``"row"`` (as the tutorial input preprocessing). See the specification §7.
    dtype
        Parameter dtype (official files stored in fp16 are upcast to this).
    trust_checkpoint
        Allow arbitrary pickled objects in a ``.pth`` (``torch.load(weights_only=False)``). Only for
        files from a trusted source.
    verify
        Check the sha256 of a squall-sd directory's weights against the recorded one.
    img_size
        Tile size of an official checkpoint (not stored in it).
    mpp
        Default µm/px recorded in the configuration of an official checkpoint (0.5 if omitted;
        use 4.0 for ``SQUALL_lowres.pth``).
    hub_kwargs
        Extra arguments for :func:`huggingface_hub.hf_hub_download` (``revision``, ``cache_dir``,
        ``local_dir``, ``token``, ...).

    Returns
    -------
    The model in eval mode, with ``weights_sha256`` and ``weights_source`` set.

    Raises
    ------
    CheckpointError
        If the file cannot be read or its keys/shapes do not match (missing, unexpected and
        mismatched keys are listed).

    """
    source = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and source.startswith("hf://"):
        path = _resolve_hf(source, hub_kwargs or {})
    else:
        path = Path(source).expanduser()
    common = {
        "genes_file": genes_file,
        "map_location": map_location,
        "gene_order": gene_order,
        "dtype": dtype,
    }
    if path.is_dir():
        model = _load_directory(path, verify=verify, **common)
    elif path.is_file():
        if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
            model = _load_directory(path.parent, verify=verify, **common)
        elif path.suffix.lower() in _OFFICIAL_SUFFIXES or path.suffix == "":
            model = _load_official(
                path, trust_checkpoint=trust_checkpoint, img_size=img_size, mpp=mpp, **common
            )
        else:
            raise CheckpointError(
                f"Don't know how to load {path}: expected a squall-sd directory or an official "
                "SQUALL "
                f"checkpoint ({', '.join(_OFFICIAL_SUFFIXES)})."
            )
    elif source in _bundled():
        model = _load_directory(_bundled()[source], verify=verify, **common)
        model.weights_source = source
    elif source in list_configs():
        hint = ""
        if source == "squall-555m":
            hint = (
                " The official SQUALL weights (CC BY-NC-ND 4.0) are not distributed with "
                "squall-sd: download "
                "e.g. SQUALL_full.pth from huggingface.co/zongxu/SQUALL yourself and call "
                "`squall.models.load('SQUALL_full.pth', genes_file='gene_token_homologs.csv')`."
            )
        raise FileNotFoundError(
            f"Model {source!r} is registered but has no bundled weights.{hint} Use "
            f"`squall.models.create({source!r})` for random weights. Bundled models: "
            f"{sorted(_bundled())}."
        )
    else:
        raise FileNotFoundError(
            f"{source!r} is neither a file, a directory, a bundled model ({sorted(_bundled())}) "
            "nor a "
            f"registered architecture ({list_configs()})."
        )
    logger.info("Loaded model %r from %s", model.config.name, model.weights_source)
    return model
