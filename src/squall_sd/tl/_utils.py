"""Helpers shared by the :mod:`squall_sd.tl` tools: representations, spatial graphs, provenance."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from squall_sd._logging import logger

if TYPE_CHECKING:
    from squall_sd.models import Squall

__all__ = [
    "aggregate_neighbors",
    "build_spatial_graph",
    "get_connectivities",
    "get_representation",
    "provenance",
    "spatial_connectivities",
]


def provenance(model: Squall | None = None, /, **params: Any) -> dict[str, Any]:
    """Return a provenance record for ``uns``: the one builder every :mod:`squall_sd.tl` tool uses.

    Parameters
    ----------
    model
        The SQUALL model a tool ran (:func:`~squall_sd.tl.predict_expression`, :func:`~squall_sd.tl.embed`).
    **params
        The tool's parameters.

    Returns
    -------
    Without ``model``: ``{"squall_sd_version": ..., **params}``. With ``model``: ``squall_sd_version``,
    ``model`` (name), ``weights_sha256``, ``weights_source`` and ``params`` (the parameters that are
    not ``None``, as plain Python values).
    """
    try:
        pkg_version = version("squall-sd")
    except PackageNotFoundError:  # pragma: no cover - source tree without install
        pkg_version = "0.0.0+unknown"
    if model is None:
        return {"squall_sd_version": pkg_version, **params}
    return {
        "squall_sd_version": pkg_version,
        "model": model.config.name,
        "weights_sha256": model.weights_sha256 or "none (random weights)",
        "weights_source": model.weights_source or "none",
        "params": {k: _plain(v) for k, v in params.items() if v is not None},
    }


def _plain(v: Any) -> Any:
    """``v`` as a plain Python value for ``uns`` (numpy scalars unwrapped, sequences as lists, others as str)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) else str(v)


def _looks_like_counts(X: Any) -> bool:
    """Whether a matrix looks like raw integer counts (checks a sample of its values)."""
    vals = X.data if sparse.issparse(X) else np.asarray(X).ravel()
    vals = np.asarray(vals[:100_000])
    if vals.size == 0:
        return False
    return bool(np.all(np.mod(vals, 1) == 0) and vals.max() > 30)


def get_representation(
    adata: AnnData,
    use_rep: str,
    *,
    n_pcs: int | None = None,
    random_state: int = 0,
) -> tuple[np.ndarray, str]:
    """Return a dense cells × features representation.

    Parameters
    ----------
    adata
        Annotated data.
    use_rep
        ``"X"``, a key of ``obsm`` (e.g. ``"X_pca"``, ``"X_squall"``) or a key of ``layers``
        (e.g. predicted expression). Gene matrices (``"X"`` or a layer) are reduced by PCA to
        ``n_pcs`` components; their genes that are NaN in every observation (genes a model did not
        predict) are left out.
    n_pcs
        Use at most this many leading columns of an ``obsm`` representation, or compute this
        many principal components of a gene matrix (``None``: all columns / 50 components).
    random_state
        Seed of the PCA solver.

    Returns
    -------
    The representation (float32) and a description of where it came from.

    """
    if use_rep in adata.obsm:
        rep = adata.obsm[use_rep]
        rep = rep.to_numpy() if isinstance(rep, pd.DataFrame) else rep
        rep = rep.toarray() if sparse.issparse(rep) else np.asarray(rep)
        if rep.ndim != 2:
            raise ValueError(
                f"Expected `adata.obsm[{use_rep!r}]` to be 2-D, found shape {rep.shape}."
            )
        if n_pcs is not None:
            rep = rep[:, :n_pcs]
        return np.ascontiguousarray(rep, dtype=np.float32), f"obsm[{use_rep!r}]"
    if use_rep == "X" or use_rep in adata.layers:
        X = adata.X if use_rep == "X" else adata.layers[use_rep]
        where = "X" if use_rep == "X" else f"layers[{use_rep!r}]"
        if X is None:
            raise ValueError(f"`adata.{where}` is empty.")
        X = _drop_unpredicted(X, where)
        if _looks_like_counts(X):
            logger.warning(
                "`adata.%s` looks like raw counts; niches and trajectories are usually computed on "
                "normalised data (e.g. `sc.pp.normalize_total(adata)` then `sc.pp.log1p(adata)`).",
                where,
            )
        from sklearn.decomposition import PCA, TruncatedSVD

        n_comps = min(n_pcs or 50, X.shape[1] - 1, X.shape[0] - 1)
        if n_comps < 1:
            raise ValueError(f"`adata.{where}` has too few features/observations for a PCA.")
        X = X.astype(np.float32)
        if sparse.issparse(X):
            # centre implicitly: TruncatedSVD on the sparse matrix, then centre the scores
            rep = TruncatedSVD(n_comps, random_state=random_state).fit_transform(X)
            rep -= rep.mean(0)
        else:
            rep = PCA(n_comps, random_state=random_state).fit_transform(np.asarray(X))
        logger.info("Using %d principal components of `adata.%s`", n_comps, where)
        return np.ascontiguousarray(rep, dtype=np.float32), f"PCA({n_comps}) of {where}"
    hint = _rep_hint(use_rep)
    raise KeyError(
        f"Representation {use_rep!r} not found in `adata.obsm` {list(adata.obsm.keys())} nor "
        f"`adata.layers` {list(adata.layers.keys())}. {hint}"
    )


def _drop_unpredicted(X: Any, where: str) -> Any:
    """Drop the all-NaN columns of a gene matrix (genes a model did not predict); refuse any other NaN."""
    if sparse.issparse(X):
        if np.isnan(X.data).any():
            raise ValueError(f"`adata.{where}` has missing values (NaN); fill or remove them first.")
        return X
    X = np.asarray(X)
    nan = np.isnan(X) if np.issubdtype(X.dtype, np.floating) else None
    if nan is None or not nan.any():
        return X
    empty = nan.all(axis=0)
    if (nan[:, ~empty]).any():
        raise ValueError(
            f"`adata.{where}` has missing values (NaN) in {int(nan[:, ~empty].any(axis=0).sum())} genes that are "
            "not missing everywhere; fill or remove them first."
        )
    logger.info("Ignoring %d of %d genes of `adata.%s` that are NaN everywhere (not predicted)",
                int(empty.sum()), X.shape[1], where)
    return X[:, ~empty]


def _rep_hint(use_rep: str) -> str:
    if use_rep == "X_pca":
        return (
            "Compute it with `sc.pp.normalize_total(adata); sc.pp.log1p(adata); sc.pp.pca(adata)`, "
            "or pass `use_rep='X'` (PCA of adata.X is computed on the fly) or a layer name."
        )
    if use_rep.startswith("X_squall"):
        return f"Compute it with `squall.tl.embed(sdata, model, key_added={use_rep!r})` first."
    if "predicted" in use_rep or use_rep.startswith("squall"):
        return "Compute it with `squall.tl.predict_expression(sdata, model)` first."
    return "Pass `use_rep='X'`, an existing obsm key or a layer name."


def _auto_radius(coords: np.ndarray, library: np.ndarray | None) -> float:
    """1.5 × the median nearest-neighbour distance (computed within each library)."""
    from sklearn.neighbors import NearestNeighbors

    dists = []
    groups = (
        [np.arange(len(coords))]
        if library is None
        else [np.flatnonzero(library == lib) for lib in pd.unique(library)]
    )
    for idx in groups:
        if len(idx) < 2:
            continue
        d, _ = NearestNeighbors(n_neighbors=2).fit(coords[idx]).kneighbors(coords[idx])
        dists.append(d[:, 1])
    if not dists:
        raise ValueError("Need at least two observations per library to build a spatial graph.")
    return float(1.5 * np.median(np.concatenate(dists)))


def build_spatial_graph(
    adata: AnnData,
    *,
    graph: Literal["radius", "knn", "delaunay"],
    radius: float | None,
    n_neighs: int,
    library_key: str | None,
    spatial_key: str,
    key_added: str,
) -> dict[str, Any]:
    """Build a squidpy spatial graph (per library) into ``obsp[f'{key_added}_connectivities']``.

    Returns the graph parameters (for ``uns``).
    """
    import squidpy as sq

    if spatial_key not in adata.obsm:
        raise KeyError(
            f"Spatial coordinates `adata.obsm[{spatial_key!r}]` not found; available: "
            f"{list(adata.obsm.keys())}. Pass `spatial_key=` or read the data with a "
            "`squall.io` reader."
        )
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(
                f"`library_key={library_key!r}` not found in `adata.obs`; available: "
                f"{list(adata.obs.columns)}."
            )
        if not isinstance(adata.obs[library_key].dtype, pd.CategoricalDtype):
            adata.obs[library_key] = adata.obs[library_key].astype("category")
    common = {"spatial_key": spatial_key, "library_key": library_key, "key_added": key_added}
    params: dict[str, Any] = {
        "graph": graph,
        "spatial_key": spatial_key,
        "library_key": library_key,
    }
    if graph == "radius":
        if radius is None:
            lib = None if library_key is None else adata.obs[library_key].to_numpy()
            radius = _auto_radius(np.asarray(adata.obsm[spatial_key])[:, :2], lib)
            logger.info(
                "Spatial graph radius set to %.4g (1.5 × median nearest-neighbour distance)", radius
            )
        sq.gr.spatial_neighbors_radius(adata, radius=radius, **common)
        params["radius"] = float(radius)
    elif graph == "knn":
        sq.gr.spatial_neighbors_knn(adata, n_neighs=n_neighs, **common)
        params["n_neighs"] = int(n_neighs)
    elif graph == "delaunay":
        sq.gr.spatial_neighbors_delaunay(adata, radius=radius, **common)
        params["radius"] = None if radius is None else float(radius)
    else:
        raise ValueError(
            f"Expected `graph` to be one of 'radius', 'knn', 'delaunay', found {graph!r}."
        )
    logger.info("Adding `adata.obsp['%s_connectivities']` (%s graph)", key_added, graph)
    return params


def get_connectivities(adata: AnnData, connectivity_key: str) -> sparse.csr_matrix:
    """Return ``obsp[connectivity_key]`` (the ``_connectivities`` suffix may be omitted)."""
    key = (
        connectivity_key if connectivity_key in adata.obsp else f"{connectivity_key}_connectivities"
    )
    if key not in adata.obsp:
        raise KeyError(
            f"Spatial graph `adata.obsp[{connectivity_key!r}]` not found; available: "
            f"{list(adata.obsp.keys())}. "
            "Build one with `squidpy.gr.spatial_neighbors_knn(adata, library_key=...)` (or "
            "`_radius` / "
            "`_delaunay`), or pass `connectivity_key=None` to let squall build it."
        )
    return sparse.csr_matrix(adata.obsp[key])


def check_no_cross_library_edges(adj: sparse.spmatrix, library: np.ndarray) -> None:
    """Raise if a graph connects observations of different libraries (sections)."""
    coo = sparse.coo_matrix(adj)
    codes = pd.Categorical(library).codes
    n_cross = int(np.count_nonzero(codes[coo.row] != codes[coo.col]))
    if n_cross:
        raise ValueError(
            f"The spatial graph has {n_cross} edges between different libraries (sections). "
            "Rebuild it "
            "per section, e.g. `squidpy.gr.spatial_neighbors_knn(adata, library_key=...)`, or pass "
            "`connectivity_key=None` with `library_key=` to let squall build it."
        )


def spatial_connectivities(
    adata: AnnData,
    *,
    connectivity_key: str | None,
    library_key: str | None,
    graph: Literal["radius", "knn", "delaunay"],
    radius: float | None,
    n_neighs: int,
    spatial_key: str,
    key_added: str,
) -> tuple[sparse.csr_matrix, str, dict[str, Any] | None]:
    """Return the spatial graph of ``adata``: built here, or the existing ``connectivity_key``.

    With ``connectivity_key=None`` the graph is built (:func:`build_spatial_graph`) into
    ``obsp[f'{key_added}_connectivities']``; else ``obsp[connectivity_key]`` is read
    (:func:`get_connectivities`). With ``library_key`` the graph must not join libraries.

    Returns
    -------
    ``(adjacency, key, graph_params)``: ``key`` is ``f'{key_added}_connectivities'`` or
    ``connectivity_key`` as given; ``graph_params`` is ``None`` for an existing graph.
    """
    if library_key is not None and library_key not in adata.obs:
        raise KeyError(
            f"`library_key={library_key!r}` not found in `adata.obs`; available: "
            f"{list(adata.obs.columns)}."
        )
    if connectivity_key is None:
        graph_params = build_spatial_graph(
            adata,
            graph=graph,
            radius=radius,
            n_neighs=n_neighs,
            library_key=library_key,
            spatial_key=spatial_key,
            key_added=key_added,
        )
        key = f"{key_added}_connectivities"
    else:
        graph_params = None
        key = connectivity_key
    adj = get_connectivities(adata, key)
    if library_key is not None:
        check_no_cross_library_edges(adj, adata.obs[library_key].to_numpy())
    return adj, key, graph_params


def aggregate_neighbors(rep: np.ndarray, adj: sparse.spmatrix, n_hops: int) -> np.ndarray:
    """Concatenate each observation's representation with the mean over its neighbours at each hop.

    Hop ``h`` holds the observations at exactly ``h`` edges (graph distance), as in CellCharter.
    An observation without neighbours at some hop takes the previous hop's mean (itself at hop 1).

    Parameters
    ----------
    rep
        Observations × features.
    adj
        Observations × observations adjacency (any non-zero is an edge; the diagonal is ignored).
    n_hops
        Number of hops ``L``; the result has ``(L + 1) * n_features`` columns.

    Returns
    -------
    The aggregated representation ``[self, mean hop 1, ..., mean hop L]``.

    """
    if n_hops < 0:
        raise ValueError(f"Expected `n_hops` to be >= 0, found {n_hops}.")
    n = rep.shape[0]
    A = sparse.csr_matrix(adj, dtype=np.float32, copy=True)
    A.setdiag(0)
    A.eliminate_zeros()
    A.data[:] = 1.0
    A = ((A + A.T) > 0).astype(np.float32).tocsr()  # symmetrise
    visited = (A + sparse.identity(n, dtype=np.float32, format="csr")).astype(bool).tocsr()
    ring = A
    blocks = [rep]
    prev = rep
    for hop in range(1, n_hops + 1):
        if hop > 1:
            reach = (ring @ A).astype(bool).tocsr()
            ring = (reach > visited).astype(np.float32).tocsr()  # reached now and not before
            visited = (visited + ring).astype(bool).tocsr()
        deg = np.asarray(ring.sum(1)).ravel()
        mean = np.asarray(ring @ rep, dtype=np.float32)
        has = deg > 0
        mean[has] /= deg[has, None]
        mean[~has] = prev[~has]
        blocks.append(mean)
        prev = mean
    return np.hstack(blocks).astype(np.float32, copy=False)
