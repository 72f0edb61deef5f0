"""Niche-aware diffusion pseudotime (scanpy ``dpt`` over a neighbourhood-aggregated input)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import resolve_adata
from squall_sd.tl._utils import aggregate_neighbors, get_representation, provenance, spatial_connectivities

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData

__all__ = ["trajectory"]

Root = int | str | tuple[str, Any] | np.ndarray | pd.Series | list


def _root_mask(adata: AnnData, root: Root) -> tuple[np.ndarray | None, int | None, str]:
    """Resolve ``root`` into either a single index or a boolean mask of candidate cells."""
    if isinstance(root, tuple):
        if len(root) != 2:
            raise ValueError(f"Expected `root=(obs_key, category)`, found {root!r}.")
        key, cat = root
        if key not in adata.obs:
            raise KeyError(f"`root` column {key!r} not found in `adata.obs`; available: {list(adata.obs.columns)}.")
        mask = (adata.obs[key] == cat).to_numpy()
        if not mask.any():
            values = list(pd.unique(adata.obs[key].dropna()))[:20]
            raise ValueError(f"No observation has `obs[{key!r}] == {cat!r}`; values present: {values}.")
        return mask, None, f"obs[{key!r}] == {cat!r}"
    if isinstance(root, str):
        if root not in adata.obs_names:
            raise KeyError(f"`root={root!r}` is not an observation name (`adata.obs_names`).")
        return None, int(adata.obs_names.get_loc(root)), f"obs_name {root!r}"
    if isinstance(root, int | np.integer):
        if not -adata.n_obs <= int(root) < adata.n_obs:
            raise IndexError(f"`root={root}` is out of range for {adata.n_obs} observations.")
        return None, int(root) % adata.n_obs, f"position {int(root)}"
    mask = np.asarray(root)
    if mask.dtype != bool or mask.shape != (adata.n_obs,):
        raise TypeError(
            "Expected `root` to be an observation name, an integer position, a boolean mask "
            "of length "
            f"n_obs ({adata.n_obs}) or a tuple `(obs_key, category)`, found {type(root).__name__}."
        )
    if not mask.any():
        raise ValueError("The `root` mask selects no observation.")
    return mask, None, f"mask of {int(mask.sum())} observations"


@d.dedent
def trajectory(  # noqa: D417 - parameters from squall_sd._docs
    data: AnnData | SpatialData,
    *,
    root: int | str | tuple[str, Any] | Sequence[bool] | np.ndarray,
    use_rep: str = "X_pca",
    table_key: str | None = None,
    niche_aware: bool = True,
    library_key: str | None = None,
    spatial_key: str = "spatial",
    connectivity_key: str | None = None,
    graph: Literal["radius", "knn", "delaunay"] = "radius",
    radius: float | None = None,
    n_neighs: int = 6,
    n_hops: int = 1,
    n_pcs: int | None = 30,
    n_neighbors: int = 15,
    n_dcs: int = 10,
    key_added: str = "squall_pseudotime",
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Diffusion pseudotime, optionally over the spatial neighbourhood of each observation.

    With ``niche_aware=True`` the representation of each observation is concatenated with the
    mean representation of its spatial neighbours at 1 … ``n_hops`` hops (as in
    :func:`squall_sd.tl.niches`), so that the trajectory follows tissue context (e.g. in situ →
    invasive carcinoma) and not only the spot's own profile. A Gaussian-kernel kNN graph of that
    representation, a diffusion map and :func:`scanpy.tl.dpt` (Haghverdi et al. 2016) follow.

    Parameters
    ----------
    %(data_table)s
    root
        Where pseudotime starts: an observation name, an integer position, a boolean mask, or
        ``(obs_key, category)`` such as ``("pathologist_label", "cancer in situ")``. For a mask
        or a group, the root is the member lying furthest out along diffusion component 1 on the
        side where the group lies.
    %(use_rep)s
    %(table_key_data)s
    niche_aware
        Aggregate the spatial neighbourhood into the representation; ``library_key`` and the
        spatial graph parameters below are used only then.
    %(library_key)s
    %(spatial_graph)s
    n_hops
        Hops aggregated when ``niche_aware``.
    %(n_pcs)s
    n_neighbors
        Neighbours of the kNN graph in representation space.
    n_dcs
        Diffusion components used by DPT.
    %(key_added)s
    random_state
        Seed of the PCA (gene-matrix input).
    %(copy)s

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - :attr:`anndata.AnnData.obs` ``[key_added]`` - diffusion pseudotime in [0, 1],
    - :attr:`anndata.AnnData.obsm` ``[f"X_{key_added}_diffmap"]`` - the diffusion components,
    - :attr:`anndata.AnnData.uns` ``[key_added]`` - parameters, provenance and the root chosen.

    Raises
    ------
    KeyError
        If ``use_rep``, the root column or ``connectivity_key`` is missing.

    """
    import scanpy as sc

    adata = resolve_adata(data, table_key)
    if copy:
        adata = adata.copy()
    mask, root_idx, root_desc = _root_mask(adata, root)
    rep, rep_desc = get_representation(adata, use_rep, n_pcs=n_pcs, random_state=random_state)
    graph_params: dict[str, Any] | None = None
    if niche_aware:
        adj, connectivity_key, graph_params = spatial_connectivities(
            adata,
            connectivity_key=connectivity_key,
            library_key=library_key,
            graph=graph,
            radius=radius,
            n_neighs=n_neighs,
            spatial_key=spatial_key,
            key_added=key_added,
        )
        rep = aggregate_neighbors(rep, adj, n_hops)

    tmp = AnnData(np.zeros((adata.n_obs, 0), dtype=np.float32), obsm={"X_rep": rep})
    sc.pp.neighbors(
        tmp,
        use_rep="X_rep",
        n_neighbors=min(n_neighbors, adata.n_obs - 1),
        method="gauss",
        transformer="sklearn",
        random_state=random_state,
    )
    sc.tl.diffmap(tmp, n_comps=min(max(n_dcs, 3), adata.n_obs - 2))
    dc = tmp.obsm["X_diffmap"]
    if root_idx is None:
        dc1 = dc[:, 1]
        members = np.flatnonzero(mask)
        side = np.sign(dc1[members].mean() - np.median(dc1)) or 1.0
        root_idx = int(members[np.argmax(side * dc1[members])])
    tmp.uns["iroot"] = root_idx
    sc.tl.dpt(tmp, n_dcs=min(n_dcs, dc.shape[1]))
    pt = tmp.obs["dpt_pseudotime"].to_numpy(dtype=float)
    n_bad = int(np.count_nonzero(~np.isfinite(pt)))
    if n_bad:
        logger.warning(
            "%d observations are not connected to the root in the kNN graph; their pseudotime is NaN.",
            n_bad,
        )
        pt = np.where(np.isfinite(pt), pt, np.nan)
    adata.obs[key_added] = pt
    adata.obsm[f"X_{key_added}_diffmap"] = dc
    adata.uns[key_added] = provenance(
        use_rep=use_rep,
        representation=rep_desc,
        niche_aware=bool(niche_aware),
        n_hops=int(n_hops) if niche_aware else 0,
        connectivity_key=connectivity_key if niche_aware else None,
        graph_params=graph_params,
        library_key=library_key,
        n_neighbors=int(n_neighbors),
        n_dcs=int(n_dcs),
        root=root_desc,
        root_index=int(root_idx),
        root_obs_name=str(adata.obs_names[root_idx]),
    )
    logger.info(
        "Adding `adata.obs[%r]`, `adata.obsm['X_%s_diffmap']`, `adata.uns[%r]`",
        key_added,
        key_added,
        key_added,
    )
    return adata if copy else None
