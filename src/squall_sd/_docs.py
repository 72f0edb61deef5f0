"""Shared parameter descriptions for the docstrings (docrep, as in squidpy's ``_docs.py``).

A public function whose docstring uses ``%(name)s`` is decorated with ``@d.dedent``: the
docstring is dedented and each ``%(name)s`` replaced by the fragment ``name`` below, so that a
recurring parameter is described once. A fragment states only what holds for every function using
it; where a function's default or meaning differs, its docstring keeps its own description.
A docstring decorated with ``@d.dedent`` writes a literal percent sign as ``%%``.

Fragments are numpy-style ``Parameters`` entries without indentation (``name`` on one line, the
description indented by four spaces below it).
"""

from __future__ import annotations

from docrep import DocstringProcessor

__all__ = ["d"]

# ---------------------------------------------------------------------------------------------
# tools working on a table (AnnData, or a table of a SpatialData)
# ---------------------------------------------------------------------------------------------
_data_table = """\
data
    AnnData, or SpatialData whose table ``table_key`` is used."""

_table_key_data = """\
table_key
    Table of a SpatialData input: default ``"table"``, else the only table. Ignored for an
    AnnData."""

_copy = """\
copy
    Return a modified copy of the table instead of writing in place."""

_key_added = """\
key_added
    Name of the outputs (see Returns)."""

_use_rep = """\
use_rep
    Representation to use: a key of ``obsm`` (``"X_pca"``, ``"X_squall"`` embeddings, …),
    ``"X"`` or a key of ``layers`` (e.g. predicted expression). Gene matrices are reduced to
    ``n_pcs`` principal components first; they should be normalised (e.g. log1p CP10k). Genes
    that are NaN everywhere (not predicted, in a ``predict_expression`` layer) are left out."""

_n_pcs = """\
n_pcs
    Leading components of the representation used (or principal components computed for a
    gene matrix). ``None``: all columns."""

_library_key = """\
library_key
    Column of ``obs`` naming the section of each observation; the spatial graph is built per
    section."""

_spatial_graph = """\
spatial_key
    Key of the coordinates in ``obsm`` (``squall.io`` readers store microns).
connectivity_key
    Existing spatial graph in ``obsp`` to use. ``None`` (default) builds one with ``graph``,
    ``radius`` and ``n_neighs`` and writes it to ``obsp[f"{key_added}_connectivities"]``.
graph
    How to build the graph: ``"radius"`` (all neighbours within ``radius``), ``"knn"``
    (``n_neighs`` nearest) or ``"delaunay"`` (triangulation, edges longer than ``radius``
    dropped if given).
radius
    Radius in the units of ``obsm[spatial_key]`` (microns for ``squall.io`` data). ``None``
    with ``graph="radius"``: 1.5 × the median nearest-neighbour distance.
n_neighs
    Number of neighbours of the ``"knn"`` graph."""

# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
_data_plot = """\
data
    SpatialData (spots drawn with their true radius over the H&E, in ``"microns"``), or an
    AnnData (discs at ``obsm["spatial"]``, in µm, without the H&E)."""

_table_key_plot = """\
table_key
    Table of a SpatialData; default the one table annotating the spots."""

_shapes_key_plot = """\
shapes_key
    Spots to plot; default the element the table annotates."""

_image_key_he = """\
image_key
    The H&E; default the only image (or the one recorded by the reader)."""

_show_image = """\
show_image
    Draw the H&E behind the spots."""

_spot_style = """\
fill_alpha
    Opacity of the spots.
pad_um
    Margin around the spots, in microns."""

_save = """\
save
    Save the figure to this path (format from the suffix)."""

# ---------------------------------------------------------------------------------------------
# inference on the H&E (predict_expression, embed)
# ---------------------------------------------------------------------------------------------
_inference_inputs = """\
sdata
    SpatialData with an H&E image registered in ``microns``.
model
    A model (:func:`squall_sd.models.load`) or the name / path to load. It is put in eval mode
    and moved to ``device``.
image_key
    The H&E; default the only image (or the one recorded by the reader)."""

_table_key_region = """\
table_key
    Table annotating the region; default the one table that does (none: a new table)."""

_virtual_spots = """\
spots
    Use virtual ``"visium"`` spots, ``"bins"`` or ``"tiles"`` laid over the tissue (default
    ``"visium"`` when the SpatialData has no shapes).
spot_size_um
    Virtual spot diameter / bin or tile edge in µm (defaults of :func:`squall_sd.pp.make_spots`)."""

_labels_key = """\
labels_key
    Labels element of cells (vectorised with :func:`spatialdata.to_polygons`)."""

_inference = """\
batch_size
    Tiles per forward pass.
num_workers
    DataLoader worker processes reading tiles (0: a thread of the main process reads them while
    the model runs). ``"auto"``: 0 on the CPU, ``min(8, cores // 2)`` on a GPU, where one
    reading thread cannot keep up with the forward pass.
device
    ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
autocast
    bf16 autocast; default on for CUDA, off on CPU.
max_upsample
    Refuse models whose µm/px is finer than the image's by more than this factor."""

_progress = """\
progress
    Show a progress bar."""

_write_to_store = """\
write_to_store
    Also write the new or changed elements to ``sdata``'s zarr store (default: when ``sdata``
    is backed). Happens only after the computation succeeded."""

# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
_image_key_pp = """\
image_key
    Key of the image in ``sdata.images``; it needs a transformation to ``microns``."""

_mpp_tile = """\
mpp
    µm per pixel of the tile."""

_overwrite_element = """\
overwrite
    Replace an existing element ``key_added``."""

d = DocstringProcessor(
    data_table=_data_table,
    table_key_data=_table_key_data,
    copy=_copy,
    key_added=_key_added,
    use_rep=_use_rep,
    n_pcs=_n_pcs,
    library_key=_library_key,
    spatial_graph=_spatial_graph,
    data_plot=_data_plot,
    table_key_plot=_table_key_plot,
    shapes_key_plot=_shapes_key_plot,
    image_key_he=_image_key_he,
    show_image=_show_image,
    spot_style=_spot_style,
    save=_save,
    labels_key=_labels_key,
    inference_inputs=_inference_inputs,
    table_key_region=_table_key_region,
    virtual_spots=_virtual_spots,
    inference=_inference,
    progress=_progress,
    write_to_store=_write_to_store,
    image_key_pp=_image_key_pp,
    mpp_tile=_mpp_tile,
    overwrite_element=_overwrite_element,
)
