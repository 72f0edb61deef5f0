"""Sphinx configuration of the squall-sd documentation."""

from __future__ import annotations

import os
from importlib.metadata import version as _version

os.environ.setdefault("HF_HUB_OFFLINE", "1")

project = "squall-sd"
author = "squall-sd developers"
copyright = "2026, squall-sd developers"
try:
    release = _version("squall-sd")
except Exception:  # pragma: no cover
    release = "0.0.0"
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "comma"
always_document_param_types = False
nitpicky = False

# notebooks in docs are executed by the notebook CI job, not here
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]


html_theme = "furo"
html_title = "squall-sd"
suppress_warnings = ["mystnb.unknown_mime_type"]
