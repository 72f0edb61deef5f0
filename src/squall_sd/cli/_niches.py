"""``squall niches STORE.zarr``: spatial niches of a table, written back into the store atomically."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from squall_sd._logging import logger

__all__ = ["add_niches_parser", "run_niches"]


def _check_keys(adata: Any, *, store: Path, table_key: str, use_rep: str, key_added: str, overwrite: bool,
                obs_keys: dict[str, str | None], obsm_keys: dict[str, str | None],
                obsp_keys: dict[str, str | None]) -> None:
    """Raise a :class:`KeyError` / :class:`FileExistsError` naming the option to change, before any work."""
    where = f"table {table_key!r} of {str(store)!r}"
    if use_rep != "X" and use_rep not in adata.obsm and use_rep not in adata.layers:
        raise KeyError(
            f"Representation {use_rep!r} not found in {where}: obsm has {list(adata.obsm)}, layers has "
            f"{list(adata.layers)}. Pass --use-rep with one of them (e.g. --use-rep squall for the expression "
            "predicted by `squall predict`), or --use-rep X for a PCA of the (normalised) expression matrix."
        )
    for keys, axis in ((obs_keys, "obs"), (obsm_keys, "obsm"), (obsp_keys, "obsp")):
        for option, key in keys.items():
            present = list(getattr(adata, axis).keys())
            if key is not None and key not in present:
                raise KeyError(
                    f"{option} {key!r} not found in `{axis}` of {where}; available: {present}. Pass {option} with "
                    "one of them."
                )
    if key_added in adata.obs and not overwrite:
        raise FileExistsError(
            f"Column {key_added!r} already exists in `obs` of {where}. Pass --overwrite to replace it, or "
            "--key-added to write the niches under another name."
        )


def run_niches(
    store: str | Path,
    *,
    table_key: str | None = None,
    use_rep: str = "X_pca",
    key_added: str = "squall_niche",
    library_key: str | None = None,
    batch_key: str | None = None,
    spatial_key: str = "spatial",
    connectivity_key: str | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Find spatial niches in a table of a SpatialData store and write them back into the store.

    The store is read, :func:`squall_sd.tl.niches` runs in memory and the whole store is then
    rewritten atomically with :func:`squall_sd.io.write` (as ``squall predict`` writes its outputs):
    on any error, before or during the write, the store is left as it was.

    Parameters
    ----------
    store
        SpatialData ``.zarr`` store.
    table_key
        Table to use (default: ``"table"``, or the only table).
    use_rep
        Representation: a key of ``obsm``, a key of ``layers`` or ``"X"``
        (see :func:`squall_sd.tl.niches`).
    key_added
        Name of the outputs (``obs[key_added]``, ...).
    library_key
        Column of ``obs`` naming the section of each observation.
    batch_key
        Column of ``obs`` naming batches whose representation is aligned.
    spatial_key
        Key of the coordinates in ``obsm``.
    connectivity_key
        Existing graph in ``obsp`` to use instead of building one.
    overwrite
        Replace an existing ``obs[key_added]``.
    **kwargs
        Passed to :func:`squall_sd.tl.niches`.

    Returns
    -------
    The path of the store.

    Raises
    ------
    FileNotFoundError
        If ``store`` does not exist or is not a SpatialData zarr store.
    KeyError
        If the table, the representation or another key is missing.
    FileExistsError
        If ``obs[key_added]`` exists and ``overwrite`` is false.

    """
    import spatialdata as sd

    from squall_sd._sdata import check_path
    from squall_sd.io import write
    from squall_sd.tl import niches

    store = check_path(store, "SpatialData zarr store", kind="dir")
    if not any((store / meta).is_file() for meta in ("zarr.json", ".zgroup")):
        raise FileNotFoundError(
            f"{str(store)!r} is a folder but not a zarr store. Pass a SpatialData .zarr store "
            "(e.g. the output of `squall predict` or `squall demo`)."
        )
    sdata = sd.read_zarr(store)
    tables = list(sdata.tables)
    if not tables:
        raise KeyError(f"{str(store)!r} has no table; niches need a table with spatial coordinates (obsm).")
    if table_key is None:
        if "table" not in tables and len(tables) > 1:
            raise KeyError(f"{str(store)!r} has several tables {tables}; pass --table-key with one of them.")
        table_key = "table" if "table" in tables else tables[0]
    elif table_key not in tables:
        raise KeyError(
            f"Table {table_key!r} not found in {str(store)!r}; available: {tables}. Pass --table-key with one of them."
        )
    adata = sdata.tables[table_key]
    _check_keys(
        adata, store=store, table_key=table_key, use_rep=use_rep, key_added=key_added, overwrite=overwrite,
        obs_keys={"--library-key": library_key, "--batch-key": batch_key},
        obsm_keys={"--spatial-key": spatial_key},
        obsp_keys={"--connectivity-key": connectivity_key},
    )
    niches(
        adata, use_rep=use_rep, key_added=key_added, library_key=library_key, batch_key=batch_key,
        spatial_key=spatial_key, connectivity_key=connectivity_key, **kwargs,
    )
    # the whole store is rewritten next to itself and swapped in only once complete
    path = write(sdata, store, overwrite=True)
    logger.info(
        "niches: wrote %d niches to obs[%r] of table %r in %s",
        adata.obs[key_added].nunique(), key_added, table_key, path,
    )
    return path


def _n_niches(values: Sequence[int] | None) -> int | list[int] | None:
    if not values:
        return None
    return int(values[0]) if len(values) == 1 else [int(v) for v in values]


def add_niches_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``niches`` subcommand on the ``squall`` sub-parsers ``sub``.

    Parameters
    ----------
    sub
        The object returned by :meth:`argparse.ArgumentParser.add_subparsers`.

    Returns
    -------
    The ``niches`` parser.

    """
    p = sub.add_parser(
        "niches",
        help="find spatial niches in a SpatialData store and write them into it",
        description="Find spatial niches (squall.tl.niches: neighbourhood aggregation of a representation, then "
        "a Gaussian mixture or Leiden) and write them into the store, atomically: obs[KEY_ADDED], "
        "obsm['X_KEY_ADDED'], the graph in obsp and the parameters in uns.",
    )
    p.add_argument("store", help="SpatialData zarr store (e.g. from `squall predict`)")
    p.add_argument("--table-key", default=None, help="table to use (default: 'table', or the only table)")
    p.add_argument(
        "--use-rep", default="X_pca",
        help="representation: an obsm key (X_pca, X_squall, ...), a layer (e.g. squall, the predicted expression) "
        "or X; gene matrices are reduced by PCA and should be normalised (default: %(default)s)",
    )
    p.add_argument("--method", choices=["gmm", "leiden"], default="gmm", help="clustering (default: %(default)s)")
    p.add_argument(
        "--n-niches", type=int, nargs="+", default=None, metavar="K",
        help="gmm: a number of niches, or several candidates among which the most stable is chosen "
        "(default: 2 to 10)",
    )
    p.add_argument("--n-runs", type=int, default=10, help="gmm: fits per candidate (default: %(default)s)")
    p.add_argument("--resolution", type=float, default=1.0, help="leiden: resolution (default: %(default)s)")
    p.add_argument("--n-pcs", type=int, default=10, help="leading components used (default: %(default)s)")
    p.add_argument("--n-hops", type=int, default=3, help="neighbourhood hops aggregated (default: %(default)s)")
    p.add_argument("--graph", choices=["radius", "knn", "delaunay"], default="radius",
                   help="spatial graph (default: %(default)s)")
    p.add_argument("--radius", type=float, default=None,
                   help="graph radius in the units of the coordinates, µm for squall stores "
                   "(default: 1.5 x the median nearest-neighbour distance)")
    p.add_argument("--n-neighs", type=int, default=6, help="neighbours of --graph knn (default: %(default)s)")
    p.add_argument("--library-key", default=None, help="obs column with the section of each observation")
    p.add_argument("--batch-key", default=None, help="obs column with batches to align first")
    p.add_argument("--spatial-key", default="spatial", help="obsm key of the coordinates (default: %(default)s)")
    p.add_argument("--connectivity-key", default=None, help="existing obsp graph to use instead of building one")
    p.add_argument("--key-added", default="squall_niche", help="name of the outputs (default: %(default)s)")
    p.add_argument("--random-state", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing obs[KEY_ADDED]")
    p.set_defaults(func=_niches_cmd)
    return p


def _niches_cmd(args: argparse.Namespace) -> int:
    run_niches(
        args.store, table_key=args.table_key, use_rep=args.use_rep, key_added=args.key_added,
        library_key=args.library_key, batch_key=args.batch_key, spatial_key=args.spatial_key,
        connectivity_key=args.connectivity_key, overwrite=args.overwrite, method=args.method,
        n_niches=_n_niches(args.n_niches), n_runs=args.n_runs, resolution=args.resolution, n_pcs=args.n_pcs,
        n_hops=args.n_hops, graph=args.graph, radius=args.radius, n_neighs=args.n_neighs,
        random_state=args.random_state,
    )
    return 0
