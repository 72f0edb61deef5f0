"""Real-data fixtures for the preprocessing tests (her2st C2, MOB1), built with the io helpers."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

from squall_sd._sdata import microns_scale
from squall_sd.io._common import circles_element, image_element, make_sdata, set_attrs, table_element

#: µm/px of the full-resolution her2st C images (sections.csv) and of the MOB JPGs (data README).
C2_MPP = 0.69
MOB_MPP = 3.0
MOB_SPOT_DIAMETER_UM = 55.0


def _load_jpg(path: Path, reduce: int = 1) -> tuple[np.ndarray, float]:
    """Decode a JPEG (at 1/reduce of its size, JPEG draft mode); return (array, size factor)."""
    Image.MAX_IMAGE_PIXELS = None
    im = Image.open(path)
    full_w = im.size[0]
    if reduce > 1:
        im.draft("RGB", (im.size[0] // reduce, im.size[1] // reduce))
    arr = np.asarray(im.convert("RGB"))
    return arr, full_w / arr.shape[1]


@pytest.fixture(scope="session")
def c2_raw(shared_data):
    """her2st C2 at 1/4 resolution (~2.76 µm/px), and its selected spots in full-res pixels."""
    arr, factor = _load_jpg(shared_data / "her2st" / "images" / "C2.jpg", reduce=4)
    spots = pd.read_csv(shared_data / "her2st" / "spots" / "C2_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1].reset_index(drop=True)
    return arr, C2_MPP * factor, spots, factor


@pytest.fixture(scope="session")
def mob_raw(shared_data):
    """MOB1 image (3 µm/px), its under-tissue spots and their counts (Ensembl ids + symbols)."""
    arr, _ = _load_jpg(shared_data / "mob" / "MOB1.jpg")
    align = pd.read_csv(shared_data / "mob" / "alignment_table_MOB1.tsv", sep="\t")
    align = align[align["selected"] == 1]
    align.index = [f"{x}x{y}" for x, y in zip(align["x"], align["y"], strict=True)]
    counts = pd.read_csv(shared_data / "mob" / "MOB1.tsv", sep="\t", index_col=0)
    common = [i for i in align.index if i in counts.index]
    genes = pd.read_csv(shared_data / "mob" / "mouse_genes.tsv.gz", sep="\t")
    sym = dict(zip(genes["gene_id"], genes["gene_name"], strict=True))
    var = pd.DataFrame(index=counts.columns.astype(str))
    var["gene_ids"] = var.index
    var["gene_symbols"] = [sym.get(g, g) for g in var.index]
    return arr, align.loc[common], counts.loc[common], var


def build_mob_sdata(mob_raw, *, var_names: str = "gene_ids"):
    """MOB1 SpatialData: image 'he', spot circles 'spots' (in pixels, Scale to microns), 'table'."""
    arr, align, counts, var = mob_raw
    t = {"microns": microns_scale(MOB_MPP)}
    image = image_element(arr, t)
    centers = align[["pixel_x", "pixel_y"]].to_numpy(float)
    spots = circles_element(centers, MOB_SPOT_DIAMETER_UM / 2 / MOB_MPP, t)
    spots.index = pd.Index(align.index.astype(str))
    X = sparse.csr_matrix(counts.to_numpy(np.float32))
    v = var.copy()
    v.index = v[var_names].astype(str).to_numpy()
    v.index.name = None
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=counts.index.astype(str)), var=v)
    adata.var_names_make_unique()
    table = table_element(adata, "spots", instance_ids=align.index.astype(str).to_numpy())
    sdata = make_sdata(image=image, shapes={"spots": spots}, table=table)
    return set_attrs(sdata, mpp=MOB_MPP, technology="legacy_st")


def build_c2_sdata(c2_raw):
    """her2st C2 SpatialData (1/4 resolution image 'he' + selected spots 'spots', no table)."""
    arr, mpp, spots, factor = c2_raw
    t = {"microns": microns_scale(mpp)}
    image = image_element(arr, t)
    centers = spots[["pixel_x", "pixel_y"]].to_numpy(float) / factor
    circles = circles_element(centers, 50.0 / mpp, t)
    sdata = make_sdata(image=image, shapes={"spots": circles})
    return set_attrs(sdata, mpp=mpp, technology="legacy_st")


@pytest.fixture
def mob_sdata(mob_raw):
    return build_mob_sdata(mob_raw)


@pytest.fixture
def c2_sdata(c2_raw):
    return build_c2_sdata(c2_raw)
