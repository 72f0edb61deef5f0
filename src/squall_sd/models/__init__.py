"""The SQUALL model family: registry, configurations, weights I/O and the architecture.

.. code-block:: python

    import squall_sd as squall

    squall.models.list_models()                      # registered architectures (+ bundled weights)
    model = squall.models.create("squall-tiny")      # random weights
    model = squall.models.load("SQUALL_full.pth", genes_file="gene_token_homologs.csv")
    config = squall.models.read_config("my_model/")  # a saved folder's configuration, no weights
    expr = model.predict(tiles, res=0.5, genes=["ERBB2", "CD74"], aggregate="tile")

The published layout (``squall-555m``) matches the official checkpoint key for key, so official
weights that a user downloaded load strictly; squall-sd never ships them (CC BY-NC-ND 4.0).
"""

from __future__ import annotations

from squall_sd.models._checkpoint import CheckpointError, config_from_state_dict, extract_state_dict
from squall_sd.models._config import SquallConfig, get_config, register_config
from squall_sd.models._diagnostics import gene_order_diagnostics
from squall_sd.models._factory import create, load
from squall_sd.models._genes import GeneVocabulary, normalize_gene_name, read_gene_order
from squall_sd.models._registry import list_models
from squall_sd.models._squall import PretrainOutput, Squall, SquallDecoder, SquallEncoder
from squall_sd.models._weights import read_config, save_pretrained

__all__ = [
    "CheckpointError",
    "GeneVocabulary",
    "PretrainOutput",
    "Squall",
    "SquallConfig",
    "SquallDecoder",
    "SquallEncoder",
    "config_from_state_dict",
    "create",
    "extract_state_dict",
    "gene_order_diagnostics",
    "get_config",
    "list_models",
    "load",
    "normalize_gene_name",
    "read_config",
    "read_gene_order",
    "register_config",
    "save_pretrained",
]
