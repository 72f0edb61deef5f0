"""``squall demo``: read the bundled example, write it as a zarr store and draw an overview figure."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from squall_sd._constants import IMAGE_KEY, MICRONS, SPOTS_KEY, TABLE_KEY
from squall_sd._logging import logger

#: Bundled trained model the demo predicts with (when its weights ship with the package).
DEMO_MODEL = "squall-tiny-her2st"
#: Gene the overview figure shows, predicted beside measured (HER2, the section's defining marker).
DEMO_GENE = "ERBB2"
#: Layer of the demo table with the measured counts as log1p(CP10k), the bundled model's target space.
MEASURED_LAYER = "log1p_cp10k"


def _overview_prediction(sdata, png: Path, gene: str) -> None:
    """Save the predicted (left) and measured (right) expression of ``gene`` on the H&E."""
    import matplotlib.pyplot as plt

    from squall_sd.pl import expression

    axes = expression(sdata, [gene], measured_layer=MEASURED_LAYER)
    fig = np.ravel(axes)[0].figure
    lo, hi, r, n = prediction_summary(sdata.tables[TABLE_KEY], gene)
    text = (
        f"{gene} predicted from the H&E: {lo:.2f} to {hi:.2f} log1p(CP10k); "
        f"Pearson r with measured = {r:.2f} ({n} spots)"
    )
    logger.info(text)
    fig.suptitle(text, fontsize=9)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def prediction_summary(adata, gene: str) -> tuple[float, float, float, int]:
    """Range of the predicted ``gene`` (layer ``squall``) and its Pearson r with the measured log1p(CP10k)."""
    from squall_sd.tl._evaluate import pearson_per_gene

    j = list(adata.var_names).index(gene)
    pred = np.asarray(adata.layers["squall"][:, j], dtype=float).ravel()
    meas = adata.layers[MEASURED_LAYER][:, j]
    meas = np.asarray(meas.toarray() if hasattr(meas, "toarray") else meas, dtype=float).ravel()
    ok = np.isfinite(pred) & np.isfinite(meas)
    r = float(pearson_per_gene(meas[ok, None], pred[ok, None])[0])
    return float(pred[ok].min()), float(pred[ok].max()), r, int(ok.sum())


def _overview_spatialdata_plot(sdata, png: Path, color: str) -> None:
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401 - registers the .pl accessor

    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    try:
        (
            sdata.pl.render_images(IMAGE_KEY)
            .pl.render_shapes(
                SPOTS_KEY, color=color, table_name=TABLE_KEY, cmap="viridis", fill_alpha=0.7
            )
            .pl.show(coordinate_systems=MICRONS, ax=ax, title=f"{color} per spot", colorbar=True)
        )
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
        fig.savefig(png, bbox_inches="tight")
    finally:
        plt.close(fig)


def _overview_matplotlib(sdata, png: Path, color: str) -> None:
    """Fallback overview: the coarsest pyramid level with the spots as 100 µm circles, in microns."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    from squall_sd._sdata import get_mpp

    image = sdata.images[IMAGE_KEY]
    if hasattr(image, "children") and image.children:
        levels = sorted(image.children)
        full = next(iter(image[levels[0]].values()))
        arr = next(iter(image[levels[-1]].values()))
    else:
        full = arr = image
    rgb = np.moveaxis(np.asarray(arr.values), 0, -1)
    mpp = get_mpp(sdata)
    extent_um = (0, full.shape[2] * mpp, full.shape[1] * mpp, 0)  # left, right, bottom, top
    adata = sdata.tables[TABLE_KEY]
    xy = np.asarray(adata.obsm["spatial"])
    radius_um = float(sdata.attrs.get("squall", {}).get("spot_diameter_um", 100.0)) / 2
    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    try:
        ax.imshow(rgb, extent=extent_um)
        patches = PatchCollection(
            [Circle((x, y), radius_um) for x, y in xy], cmap="viridis", alpha=0.7
        )
        patches.set_array(np.asarray(adata.obs[color], dtype=float))
        ax.add_collection(patches)
        fig.colorbar(patches, ax=ax, label=color, shrink=0.7)
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
        ax.set_title(f"{color} per spot")
        fig.savefig(png, bbox_inches="tight")
    finally:
        plt.close(fig)


def run_demo(out: Path, png: Path, overwrite: bool = False) -> Path:
    """Run the demo on the bundled example (her2st section C2).

    Reads :func:`squall_sd.datasets.example`, writes it to ``out`` with :func:`squall_sd.io.write`
    (atomically; an existing store is replaced only with ``overwrite=True``) and saves an overview figure
    (H&E with the spots coloured by total counts, in microns) to ``png``.

    Parameters
    ----------
    out
        Zarr store to write.
    png
        Overview figure to write.
    overwrite
        Replace existing ``out`` and ``png``.

    Returns
    -------
    The path of the written store.

    Raises
    ------
    FileExistsError
        If ``out`` or ``png`` exists and ``overwrite`` is false.

    """
    import matplotlib

    matplotlib.use("Agg")

    from squall_sd.datasets import example
    from squall_sd.io import write

    out, png = Path(out).expanduser(), Path(png).expanduser()
    if png.exists() and not overwrite:
        raise FileExistsError(
            f"{str(png)!r} already exists. Pass --overwrite to replace it, or choose another path."
        )
    if out.exists() and not overwrite:  # checked before any work; write() checks again
        raise FileExistsError(
            f"{str(out)!r} already exists. Pass --overwrite to replace it, or choose another path."
        )
    for p in (out, png):
        if not p.parent.is_dir():
            raise FileNotFoundError(f"The folder {str(p.parent)!r} to write into does not exist.")

    logger.info("reading the bundled example (her2st C2)")
    sdata = example()
    adata = sdata.tables[TABLE_KEY]
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
    adata.obs["n_genes_by_counts"] = np.asarray((adata.X > 0).sum(axis=1)).ravel().astype(int)
    # the bundled model predicts log1p(CP10k): the measured counts on the same scale, for the figure
    import scanpy as sc

    with warnings.catch_warnings():
        # one spot of the bundled example has no counts among its genes: scanpy warns "Some cells have
        # zero counts" (UserWarning) and leaves it at 0, which is right here; only that warning is ignored
        warnings.filterwarnings("ignore", message="Some cells have zero counts", category=UserWarning)
        adata.layers[MEASURED_LAYER] = sc.pp.normalize_total(adata, target_sum=1e4, inplace=False)["X"]
    sc.pp.log1p(adata, layer=MEASURED_LAYER)

    from squall_sd.models import list_models

    if DEMO_MODEL in list_models(pretrained=True):
        from squall_sd.tl import predict_expression

        logger.info("predicting expression with the bundled model %r", DEMO_MODEL)
        predict_expression(sdata, DEMO_MODEL, progress=False, write_to_store=False)
    else:
        logger.warning("bundled model %r not found; the demo writes the data without predictions", DEMO_MODEL)

    path = write(sdata, out, overwrite=overwrite)

    tmp_png = png.with_name(f".{png.stem}.tmp{png.suffix}")
    try:
        try:
            if "squall" in adata.layers and DEMO_GENE in adata.var_names:
                _overview_prediction(sdata, tmp_png, DEMO_GENE)
            else:
                _overview_spatialdata_plot(sdata, tmp_png, "total_counts")
        except Exception as e:  # noqa: BLE001 - any plotting failure falls back to plain matplotlib
            logger.warning(
                "spatialdata-plot overview failed (%s: %s); drawing with matplotlib",
                type(e).__name__,
                e,
            )
            _overview_matplotlib(sdata, tmp_png, "total_counts")
        tmp_png.replace(png)
    finally:
        tmp_png.unlink(missing_ok=True)
    logger.info("wrote %s and %s (%d spots x %d genes)", path, png, adata.n_obs, adata.n_vars)
    return path
