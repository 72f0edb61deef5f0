"""The bundled example and loaders for public datasets kept on disk."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from importlib.resources import as_file, files
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData, deepcopy

from squall_sd._constants import CELLS_KEY, MICRONS, TABLE_KEY
from squall_sd._logging import logger
from squall_sd._sdata import check_path, microns_scale, validate_mpp
from squall_sd.io._common import circles_element, make_sdata, set_attrs, table_element
from squall_sd.io._he import lazy_image_element, open_lazy
from squall_sd.io._legacy_st import legacy_st

#: Folder (inside the package) of the bundled example.
EXAMPLE_BUNDLE = "her2st_C2"
#: Pathologist labels (her2st): the categories, in the published order.
PATHOLOGIST_LABELS = (
    "invasive cancer",
    "cancer in situ",
    "immune infiltrate",
    "breast glands",
    "connective tissue",
    "adipose tissue",
    "undetermined",
)

_extracted: list[Path] = []


def _bundle_dir(name: str = EXAMPLE_BUNDLE) -> Path:
    """Return a real folder holding the bundled files (extracted once if the package is zipped)."""
    resource = files("squall_sd.datasets").joinpath("_data", name)
    if isinstance(resource, Path) and resource.is_dir():
        return resource
    # zipped install: copy the files to a temporary folder that lives as long as the process, because
    # the image is decoded lazily after this function returns
    tmp = Path(tempfile.mkdtemp(prefix="squall_example_"))
    _extracted.append(tmp)
    for entry in resource.iterdir():
        with as_file(entry) as real:
            shutil.copyfile(real, tmp / entry.name)
    return tmp


@atexit.register
def _cleanup() -> None:  # pragma: no cover - process exit
    for tmp in _extracted:
        shutil.rmtree(tmp, ignore_errors=True)


def _her2st_root(root: str | os.PathLike) -> Path:
    r = check_path(root, "her2st data folder", kind="dir")
    if not (r / "counts").is_dir() and (r / "her2st" / "counts").is_dir():
        r = r / "her2st"
    if not (r / "counts").is_dir() or not (r / "spots").is_dir():
        raise FileNotFoundError(
            f"{str(r)!r} is not a her2st folder: expected counts/ and spots/ inside (github.com/almaan/her2st layout)."
        )
    return r


def _attach_clusters(sdata: SpatialData, path: Path) -> None:
    """Join the authors' expression clusters onto ``obs["her2st_cluster"]`` by array coordinates."""
    adata = sdata.tables[TABLE_KEY]
    clusters = pd.read_csv(path, sep="\t", index_col=0)
    key = (
        clusters["x"].round().astype(int).astype(str)
        + "x"
        + clusters["y"].round().astype(int).astype(str)
    )
    label = pd.Series(clusters["label"].to_numpy(), index=key.to_numpy())
    label = label[~label.index.duplicated()]
    values = label.reindex(adata.obs_names)
    adata.obs["her2st_cluster"] = pd.Categorical(
        values.astype("Int64").astype(str).where(values.notna())
    )


def attach_pathologist_labels(sdata: SpatialData, labels: str | os.PathLike, *, copy: bool = False) -> SpatialData:
    """Join her2st pathologist labels onto ``obs["pathologist_label"]`` of the table.

    Parameters
    ----------
    sdata
        A SpatialData read by :func:`squall_sd.io.legacy_st` (table ``obs`` holds ``array_x``/``array_y``).
    labels
        ``{section}_labeled_coordinates.tsv`` (columns ``x y pixel_x pixel_y label``). It is joined on the
        ROUNDED array coordinates ``(round(x), round(y))``; its pixel columns are in another frame and
        are ignored.
    copy
        Label a deep copy of ``sdata`` and leave ``sdata`` unchanged.

    Returns
    -------
    ``sdata`` (modified in place), or its labelled copy with ``copy=True``; spots without a label get
    ``NaN``.

    """
    path = check_path(labels, "pathologist label table", kind="file")
    if copy:
        sdata = deepcopy(sdata)
    adata = sdata.tables[TABLE_KEY]
    lab = pd.read_csv(path, sep="\t").dropna(subset=["x", "y"])
    key = lab["x"].round().astype(int).astype(str) + "x" + lab["y"].round().astype(int).astype(str)
    series = pd.Series(lab["label"].astype(str).to_numpy(), index=key.to_numpy())
    series = series[~series.index.duplicated()]
    spot_key = adata.obs["array_x"].astype(str) + "x" + adata.obs["array_y"].astype(str)
    values = series.reindex(spot_key.to_numpy()).to_numpy()
    cats = [c for c in PATHOLOGIST_LABELS if c in set(series)] + sorted(
        set(series) - set(PATHOLOGIST_LABELS)
    )
    adata.obs["pathologist_label"] = pd.Categorical(values, categories=cats)
    n = int(pd.notna(values).sum())
    logger.info("pathologist labels: %d of %d spots labelled", n, adata.n_obs)
    if n == 0:
        logger.warning("no spot matched a pathologist label of %s (different section?)", path.name)
    return sdata


def example() -> SpatialData:
    """Return the bundled example: her2st section C2 (HER2+ breast cancer, legacy ST), read with legacy_st.

    A real section from Andersson et al., Nat Commun 2021 (github.com/almaan/her2st), shipped with the
    package so that it works without any download: all 187 spots with raw counts of 985 genes (the 785
    benchmark genes of Hist2ST plus the 200 most expressed others), the H&E resized to ~2 µm/px, and the
    authors' expression clusters in ``obs["her2st_cluster"]``. Section C2 has no published pathologist
    labels.

    Returns
    -------
    SpatialData with image ``"he"``, shapes ``"spots"`` (100 µm discs) and table ``"table"``, all in the
    ``"microns"`` coordinate system (see :func:`squall_sd.io.legacy_st`).

    """
    bundle = _bundle_dir()
    meta = json.loads((bundle / "meta.json").read_text())
    sdata = legacy_st(
        bundle / "counts.tsv.gz",
        bundle / "spots.tsv",
        bundle / "he.jpg",
        image_scale=float(meta["image_scale"]),
        section=str(meta["section"]),
    )
    if (bundle / "clusters.tsv.gz").exists():
        _attach_clusters(sdata, bundle / "clusters.tsv.gz")
    sdata.attrs["squall"].update(
        {
            "dataset": f"her2st {meta['section']} (bundled example)",
            "citation": "Andersson et al., Nat Commun 2021",
        }
    )
    return sdata


def her2st(
    section: str, root: str | os.PathLike, *, labels: bool = True, register_spots: bool = True
) -> SpatialData:
    """Read one section of the her2st HER2+ breast cancer data set (legacy ST) from a local copy.

    Parameters
    ----------
    section
        Section name, e.g. ``"C2"`` or ``"A1"``.
    root
        The her2st folder (with ``counts/``, ``spots/``, ``images/``, ``sections.csv``, ``labels/``), or
        its parent.
    labels
        Attach the pathologist labels to ``obs["pathologist_label"]`` when the section has them (A1,
        C1, D1 here), joined on rounded array coordinates.
    register_spots
        Check that the spots sit on the tissue of the H&E and move them there when they clearly do
        not (:func:`squall_sd.pp.register_spots`). Of the sections with an image here only A2 moves:
        its PNG copy is offset from its spot table by about (359, -499) µm and turned by 5° (IoU of
        spots and tissue 0.51 → 0.76; A1 and C2–C6 stay as read, bit for bit).

    Returns
    -------
    SpatialData as from :func:`squall_sd.io.legacy_st`. Sections without an H&E in ``images/`` get
    spots and table only (placed in microns from the array fit).

    """
    r = _her2st_root(root)
    counts = r / "counts" / f"{section}.tsv.gz"
    if not counts.exists():
        avail = sorted(p.name.split(".")[0] for p in (r / "counts").glob("*.tsv.gz"))
        raise ValueError(f"No her2st section {section!r} in {str(r)!r}. Available: {avail}.")
    image = None
    image_scale = None
    sections_csv = r / "sections.csv"
    if sections_csv.exists():
        table = pd.read_csv(sections_csv, index_col="section")
        if section in table.index and isinstance(table.loc[section, "image"], str):
            image = r / table.loc[section, "image"]
            image_scale = float(table.loc[section, "coord_scale_to_image"])
    if image is None:
        for suffix in (".jpg", ".png", ".tif", ".tiff"):
            if (r / "images" / f"{section}{suffix}").exists():
                image = r / "images" / f"{section}{suffix}"
                logger.warning(
                    "%s: no sections.csv entry; assuming the image has full-resolution pixels",
                    section,
                )
                break
    if image is None:
        logger.info("her2st %s has no H&E here; reading spots and counts only", section)
    sdata = legacy_st(
        counts,
        r / "spots" / f"{section}_selection.tsv",
        image,
        image_scale=image_scale,
        section=section,
    )
    if register_spots and image is not None:
        from squall_sd.pp import register_spots as _register

        _register(sdata)
    lab = r / "labels" / f"{section}_labeled_coordinates.tsv"
    if labels and lab.exists():
        attach_pathologist_labels(sdata, lab)
    clusters = r / "clusters" / f"{section}-cluster-annotation.tsv.gz"
    if clusters.exists():
        _attach_clusters(sdata, clusters)
    sdata.attrs["squall"]["dataset"] = f"her2st {section}"
    return sdata


def mob(section: str | int, root: str | os.PathLike, *, gene_symbols: bool = True) -> SpatialData:
    """Read a mouse olfactory bulb section (legacy ST 2k array, STUtility example data) from a local copy.

    Parameters
    ----------
    section
        ``"MOB1"`` … ``"MOB4"`` (or 1 … 4).
    root
        The folder with ``MOB{i}.tsv``, ``alignment_table_MOB{i}.tsv`` and ``MOB{i}.jpg``, or its parent
        (holding ``mob/``).
    gene_symbols
        Use gene symbols from ``mouse_genes.tsv.gz`` as ``var_names`` (Ensembl ids stay in
        ``var["gene_ids"]``).

    Returns
    -------
    SpatialData as from :func:`squall_sd.io.legacy_st` with the spots under tissue (``selected == 1``).
    The counts hold a few spots missing from the alignment table; they are off the tissue and dropped.

    """
    name = f"MOB{section}" if isinstance(section, int) or str(section).isdigit() else str(section)
    r = check_path(root, "MOB data folder", kind="dir")
    if not (r / f"{name}.tsv").exists() and (r / "mob" / f"{name}.tsv").exists():
        r = r / "mob"
    sdata = legacy_st(
        r / f"{name}.tsv",
        r / f"alignment_table_{name}.tsv",
        r / f"{name}.jpg",
        on_unmatched="drop",
        section=name,
    )
    genes_file = r / "mouse_genes.tsv.gz"
    if gene_symbols and genes_file.exists():
        adata = sdata.tables[TABLE_KEY]
        genes = pd.read_csv(genes_file, sep="\t")
        strip = genes["gene_id"].astype(str).str.split(".").str[0]
        symbol = pd.Series(genes["gene_name"].astype(str).to_numpy(), index=strip.to_numpy())
        symbol = symbol[~symbol.index.duplicated()]
        ids = adata.var_names.astype(str)
        names = symbol.reindex(ids.str.split(".").str[0]).to_numpy()
        adata.var["gene_ids"] = ids.to_numpy()
        adata.var_names = pd.Index(np.where(pd.isna(names), ids, names).astype(str))
        adata.var_names_make_unique()
    sdata.attrs["squall"]["dataset"] = f"STUtility mouse olfactory bulb {name}"
    return sdata


def xenium_lung(
    root: str | os.PathLike,
    *,
    mpp: float | None = None,
    cell_diameter_um: float = 10.0,
    sample: str = "NCBI858",
) -> SpatialData:
    """Read the Xenium lung sample with its aligned H&E crop (HEST NCBI858, as packaged by DeepSpot).

    Parameters
    ----------
    root
        Folder with ``h5ad/{sample}.h5ad`` and ``image/{sample}.jpg``, or its parent (holding
        ``xenium_lung_ncbi858/``).
    mpp
        µm per pixel of the H&E crop. The files do not record it, so it must be given.
    cell_diameter_um
        Diameter of the circles drawn for the cells (the files hold centroids, not cell boundaries).
    sample
        Sample id.

    Returns
    -------
    SpatialData with image ``"he"``, shapes ``"cells"`` and table ``"table"`` (raw counts, CSR) in the
    ``"microns"`` coordinate system. The file's axes are swapped (image column = ``obs.y_pixel``, image
    row = ``obs.x_pixel``); they are put right here.

    Raises
    ------
    ValueError
        If ``mpp`` is not given.

    """
    r = check_path(root, "Xenium lung data folder", kind="dir")
    if not (r / "h5ad").is_dir() and (r / "xenium_lung_ncbi858" / "h5ad").is_dir():
        r = r / "xenium_lung_ncbi858"
    h5ad = check_path(r / "h5ad" / f"{sample}.h5ad", "Xenium lung h5ad", kind="file")
    img = open_lazy(r / "image" / f"{sample}.jpg")
    mpp = validate_mpp(mpp, source=f"the H&E crop {img.path.name} (its files record no µm/px)")
    cell_diameter_um = validate_mpp(cell_diameter_um, source="the cell diameter")

    adata = ad.read_h5ad(h5ad)
    # axes are swapped in this file: image column = y_pixel, image row = x_pixel
    centers = np.c_[adata.obs["y_pixel"].to_numpy(float), adata.obs["x_pixel"].to_numpy(float)]
    height, width = img.shape_yx
    inside = (centers[:, 0] < width) & (centers[:, 1] < height)
    if inside.mean() < 0.9:
        raise ValueError(
            f"Cell positions of {h5ad.name} do not fit the image {img.path.name} ({width} x {height} px)."
        )
    X = adata.X
    X = sparse.csr_matrix(
        X.astype(np.int32) if np.array_equal(np.asarray(X), np.round(np.asarray(X))) else X
    )
    obs = pd.DataFrame(index=adata.obs_names.copy())
    out = ad.AnnData(X=X, obs=obs, var=adata.var.copy())
    out.obsm["spatial"] = centers * mpp
    out.uns["squall"] = {
        "technology": "xenium",
        "sample": sample,
        "mpp": mpp,
        "spatial_units": "microns",
    }
    out = table_element(out, CELLS_KEY)
    transformations = {MICRONS: microns_scale(mpp)}
    cells = circles_element(centers, cell_diameter_um / 2.0 / mpp, transformations)
    sdata = make_sdata(image=lazy_image_element(img, mpp), shapes={CELLS_KEY: cells}, table=out)
    return set_attrs(
        sdata,
        mpp=mpp,
        technology="xenium",
        reader="squall_sd.datasets.xenium_lung",
        dataset=f"HEST {sample} (Xenium lung, via DeepSpot)",
        mpp_source="argument",
        cell_diameter_um=float(cell_diameter_um),
    )
