"""Building models: :func:`create` (fresh weights) and :func:`load` (bundled, folder, ``.pth``, Hub)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from squall_sd._logging import logger
from squall_sd.models._checkpoint import (
    OFFICIAL_SUFFIXES,
    CheckpointError,
    check_keys,
    read_official,
    resolve_hf,
)
from squall_sd.models._config import SquallConfig, get_config, list_configs
from squall_sd.models._registry import bundled
from squall_sd.models._squall import Squall
from squall_sd.models._weights import (
    CONFIG_NAME,
    FOLDER_FILES,
    WEIGHTS_NAME,
    read_model_folder,
    read_vocabulary,
    sha256_file,
)

__all__ = ["create", "load"]


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
        if name not in list_configs() and name in bundled():
            cfg_dict = json.loads((bundled()[name] / CONFIG_NAME).read_text())["config"]
            cfg = SquallConfig.from_dict(cfg_dict).replace(**overrides)
        else:
            cfg = get_config(name, **overrides)
    return Squall(cfg)


def _instantiate(cfg: SquallConfig, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype) -> Squall:
    with torch.device("meta"):
        model = Squall(cfg, init_weights=False)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, state, source)
    # copy into fresh (aligned) memory: tensors of a memory-mapped file are not aligned the way
    # freshly allocated ones are, which changes BLAS summation order in the last bits
    state = {k: v.to(dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_directory(
    directory: Path,
    *,
    genes_file: Any,
    map_location: Any,
    gene_order: str,
    dtype: torch.dtype,
    verify: bool,
) -> Squall:
    folder = read_model_folder(directory, genes_file=genes_file, gene_order=gene_order, verify=verify)
    model = _instantiate(folder.config, folder.state, str(folder.weights), dtype)
    if folder.vocabulary is not None:
        model.set_vocabulary(folder.vocabulary)
    model.weights_sha256 = folder.sha256
    model.weights_source = str(directory)
    return model.to(map_location)


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
    cfg, state = read_official(path, trust_checkpoint=trust_checkpoint, img_size=img_size, mpp=mpp)
    vocab = read_vocabulary(genes_file, cfg.n_genes, gene_order)
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
    model.weights_sha256 = sha256_file(path)
    model.weights_source = str(path)
    return model.to(map_location)


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
        path = resolve_hf(source, hub_kwargs or {}, folder_files=FOLDER_FILES)
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
        elif path.suffix.lower() in OFFICIAL_SUFFIXES or path.suffix == "":
            model = _load_official(path, trust_checkpoint=trust_checkpoint, img_size=img_size, mpp=mpp, **common)
        else:
            raise CheckpointError(
                f"Don't know how to load {path}: expected a squall-sd directory or an official "
                "SQUALL "
                f"checkpoint ({', '.join(OFFICIAL_SUFFIXES)})."
            )
    elif source in bundled():
        model = _load_directory(bundled()[source], verify=verify, **common)
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
            f"{sorted(bundled())}."
        )
    else:
        raise FileNotFoundError(
            f"{source!r} is neither a file, a directory, a bundled model ({sorted(bundled())}) "
            "nor a "
            f"registered architecture ({list_configs()})."
        )
    logger.info("Loaded model %r from %s", model.config.name, model.weights_source)
    return model
