"""The squall-sd model folder: ``config.json``, ``model.safetensors`` (+ ``.sha256``) and the genes.

Writes a model's folder (:func:`save_pretrained`) and reads one back as plain data (configuration,
state dict, vocabulary, sha256; :func:`read_model_folder`, :func:`read_config`). This module knows no
model class: it takes any model with ``config``, ``vocabulary`` and ``state_dict()``, and
:mod:`squall_sd.models._factory` builds the :class:`~squall_sd.models.Squall` from what it reads,
so the model imports this module and never the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from squall_sd._logging import logger
from squall_sd._sdata._write import staged
from squall_sd.models._checkpoint import CheckpointError
from squall_sd.models._config import SquallConfig
from squall_sd.models._genes import GeneVocabulary

__all__ = [
    "CONFIG_NAME",
    "FOLDER_FILES",
    "GENES_NAME",
    "GENES_TSV_NAME",
    "SHA_NAME",
    "WEIGHTS_NAME",
    "ModelFolder",
    "read_config",
    "read_model_folder",
    "read_vocabulary",
    "save_pretrained",
    "sha256_file",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHA_NAME = "model.safetensors.sha256"
GENES_NAME = "genes.txt"
GENES_TSV_NAME = "genes.tsv"
#: Every file a model folder may hold (what is downloaded for ``hf://owner/repo``).
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, SHA_NAME, GENES_NAME, GENES_TSV_NAME)
FORMAT = "squall-sd"
FORMAT_VERSION = 1


class _SavableModel(Protocol):
    """What :func:`save_pretrained` needs of a model (a :class:`~squall_sd.models.Squall`)."""

    config: SquallConfig
    weights_sha256: str | None

    @property
    def vocabulary(self) -> GeneVocabulary | None: ...  # noqa: D102

    def state_dict(self) -> dict[str, torch.Tensor]: ...  # noqa: D102


class ModelFolder(NamedTuple):
    """The contents of a model folder, read by :func:`read_model_folder`."""

    #: The configuration (without genes).
    config: SquallConfig
    #: The weights, on the CPU.
    state: dict[str, torch.Tensor]
    #: The genes (``None`` if the folder has none and none were given).
    vocabulary: GeneVocabulary | None
    #: sha256 of the weights file.
    sha256: str
    #: The weights file.
    weights: Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk`` bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def save_pretrained(model: _SavableModel, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
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
        raise FileExistsError(f"{directory / WEIGHTS_NAME} exists; pass overwrite=True to replace it.")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with staged(directory / WEIGHTS_NAME, mkdir=False) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": f"squall-sd {__version__}"})
    sha = sha256_file(directory / WEIGHTS_NAME)
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
# reading
# ----------------------------------------------------------------------------------------------
def read_vocabulary(genes_file: str | os.PathLike[str] | None, n: int, gene_order: str) -> GeneVocabulary | None:
    """Read a gene-order file and check it names ``n`` channels (``None`` → ``None``)."""
    if genes_file is None:
        return None
    vocab = GeneVocabulary.from_file(genes_file, order=gene_order)  # type: ignore[arg-type]
    if len(vocab) != n:
        raise ValueError(
            f"The gene-order file {genes_file} lists {len(vocab)} genes, but the weights have {n} channels."
        )
    return vocab


def read_model_folder(directory: Path, *, genes_file: Any, gene_order: str, verify: bool) -> ModelFolder:
    """Read a model folder written by :func:`save_pretrained`.

    Parameters
    ----------
    directory
        The folder.
    genes_file
        Gene-order file to use instead of the genes stored in the folder.
    gene_order
        Channel order of an official gene-order CSV.
    verify
        Check the sha256 of the weights against the recorded one.

    Returns
    -------
    The configuration, weights, genes and sha256.

    """
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
    sha = sha256_file(weights) if (verify or expected_sha is None) else expected_sha
    if verify and expected_sha and sha != expected_sha:
        raise CheckpointError(
            f"sha256 of {weights} is {sha} but {expected_sha} was recorded: the file is corrupt "
            "or was "
            "replaced. Re-download or re-save the model."
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Could not read {weights} (truncated or not a safetensors file): {err}") from err
    if genes_file is not None:
        vocab = read_vocabulary(genes_file, cfg.n_genes, gene_order)
    elif meta.get("genes_file") and (directory / meta["genes_file"]).is_file():
        vocab = read_vocabulary(directory / meta["genes_file"], cfg.n_genes, gene_order)
    elif (directory / GENES_NAME).is_file():
        vocab = read_vocabulary(directory / GENES_NAME, cfg.n_genes, gene_order)
    else:
        vocab = None
    return ModelFolder(cfg.replace(genes=None), state, vocab, sha, weights)


def read_config(directory: str | os.PathLike[str]) -> SquallConfig:
    """Read the configuration of a model folder written by ``save_pretrained``, with its genes.

    Reads ``config.json`` (the ``"config"`` entry of a squall-sd folder, or a bare configuration)
    and, when it lists no genes, ``genes.txt`` (one symbol per line). No weights are read.

    Parameters
    ----------
    directory
        The model folder.

    Returns
    -------
    The configuration.

    Raises
    ------
    FileNotFoundError
        If the folder has no ``config.json``.

    """
    folder = Path(directory).expanduser()
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a model folder: it has no config.json. Pass a registered "
            "model name (e.g. 'squall-tiny') or a folder written by `model.save_pretrained`."
        )
    data = json.loads(cfg_file.read_text())
    data = data.get("config", data) if isinstance(data, dict) else data
    genes_file = folder / GENES_NAME
    if data.get("genes") is None and genes_file.is_file():
        data["genes"] = [g for g in genes_file.read_text().splitlines() if g.strip()]
    return SquallConfig.from_dict(data)
