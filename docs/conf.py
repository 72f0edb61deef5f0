"""Sphinx configuration of the squall-sd documentation."""

from __future__ import annotations

import os
import shutil
from importlib.metadata import version as _version
from pathlib import Path

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

# notebooks in docs are executed by the notebook CI job (tests/test_notebooks.py), not here
nb_execution_mode = "off"

# The tutorial notebooks live in ../notebooks (where users run them and CI executes them). Sphinx
# reads only files inside the source folder and symlinks are not portable, so they are copied into
# tutorials/ (git-ignored there) before the sources are read; a copy is rewritten only when it
# differs, so incremental builds stay incremental.
_DOCS = Path(__file__).resolve().parent
_NOTEBOOKS = _DOCS.parent / "notebooks"
_TUTORIALS = _DOCS / "tutorials"


def _copy_notebooks() -> None:
    for src in sorted(_NOTEBOOKS.glob("*.ipynb")):
        dst = _TUTORIALS / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
    for stale in _TUTORIALS.glob("*.ipynb"):
        if not (_NOTEBOOKS / stale.name).exists():
            stale.unlink()


_copy_notebooks()
myst_enable_extensions = ["colon_fence", "dollarmath"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]


html_theme = "furo"
html_title = "squall-sd"
suppress_warnings = ["mystnb.unknown_mime_type"]
