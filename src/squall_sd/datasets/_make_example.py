"""Build the bundled example (her2st section C2) from a copy of the her2st data.

Run from the repository root (it needs ``../shared/data/her2st``, or pass its path)::

    python -m squall_sd.datasets._make_example [HER2ST_DIR] [--out src/squall_sd/datasets/_data/her2st_C2]

What it writes, all derived from the public her2st files (Andersson et al., Nat Commun 2021):

- ``counts.tsv.gz``: all spots of the section, raw UMI counts, restricted to the 785 genes of
  ``hvg785.npy`` present in the section plus the ``N_TOP`` most expressed other genes, in the original
  layout (spots × genes, first column ``"{x}x{y}"``), so :func:`squall_sd.io.legacy_st` reads it as is;
- ``spots.tsv``: the original spot-selection table, unchanged (full-resolution pixel coordinates);
- ``he.jpg``: the H&E resized from ~0.69 to ``TARGET_MPP`` µm/px (Lanczos), JPEG quality ``QUALITY``;
- ``clusters.tsv.gz``: the authors' expression clusters of the section, unchanged;
- ``meta.json``: the factor from full-resolution to ``he.jpg`` pixels (``image_scale``) and the
  provenance of every file; ``README.md``: source and citation.

The C sections are the only ones with a full-resolution H&E here; C1 has none, so C2 is bundled (no
pathologist labels exist for C2: they were published for A1, C1, D1 and J1 only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from squall_sd._logging import logger

SECTION = "C2"
#: µm per pixel of the bundled H&E.
TARGET_MPP = 2.0
QUALITY = 90
#: Most expressed genes kept besides the 785 benchmark genes.
N_TOP = 200
DEFAULT_OUT = Path(__file__).resolve().parent / "_data" / f"her2st_{SECTION}"

_README = """\
# Bundled example: her2st section {section}

A small, real legacy Spatial Transcriptomics section of a HER2-positive breast tumour (patient C,
section {section}), used by `squall_sd.datasets.example()` and `squall demo`.

**Source:** Andersson, A., Larsson, L., Stenbeck, L. et al. *Spatial deconvolution of HER2-positive
breast cancer delineates tumor-associated cell type interactions.* Nat Commun 12, 6012 (2021).
https://doi.org/10.1038/s41467-021-26271-2 -- data from https://github.com/almaan/her2st
(also Zenodo record 3957257). Please cite the paper when you use these data. Redistribution terms
are those of the original release; see the repository and the Zenodo record.

**Changes to the original files** (script: `squall_sd/datasets/_make_example.py`):

- `counts.tsv.gz`: all {n_spots} spots, raw counts, only {n_genes} of {n_genes_all} genes: the 785
  benchmark genes of Hist2ST's `hvg785.npy` ({n_hvg} present) plus the {n_top} most expressed others;
- `he.jpg`: the full-resolution H&E ({full_w} x {full_h} px, {full_mpp:.3f} µm/px) resized to
  {w} x {h} px (about {mpp:.2f} µm/px), JPEG quality {quality};
- `spots.tsv` (spot selection table, full-resolution pixel coordinates) and `clusters.tsv.gz` (the
  authors' expression clusters) are unchanged copies.

`meta.json` holds `image_scale`, the factor from the spot table's full-resolution pixels to `he.jpg`.
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_example(her2st_dir: Path, out: Path = DEFAULT_OUT, *, section: str = SECTION) -> Path:
    """Write the example bundle for ``section`` of the her2st folder ``her2st_dir`` into ``out``.

    Parameters
    ----------
    her2st_dir
        Folder with ``counts/``, ``spots/``, ``images/``, ``clusters/``, ``hvg785.npy``, ``sections.csv``.
    out
        Output folder (replaced).
    section
        Section with a full-resolution H&E.

    Returns
    -------
    The output folder.

    """
    from PIL import Image

    from squall_sd.io._legacy_st import fit_mpp, read_spot_table

    her2st_dir = Path(her2st_dir)
    sections = pd.read_csv(her2st_dir / "sections.csv", index_col="section")
    row = sections.loc[section]
    if not isinstance(row["image"], str) or float(row["coord_scale_to_image"]) != 1.0:
        raise ValueError(f"Section {section} has no full-resolution H&E in {her2st_dir}.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # counts: every spot, benchmark genes + most expressed others, original layout
    counts_src = her2st_dir / "counts" / f"{section}.tsv.gz"
    counts = pd.read_csv(counts_src, sep="\t", index_col=0)
    hvg = [str(g) for g in np.load(her2st_dir / "hvg785.npy", allow_pickle=True)]
    in_hvg = counts.columns.isin(hvg)
    others = counts.loc[:, ~in_hvg].sum(axis=0).sort_values(ascending=False).index[:N_TOP]
    keep = counts.columns[in_hvg | counts.columns.isin(others)]
    small = counts[keep]
    small.index.name = None
    small.to_csv(
        out / "counts.tsv.gz",
        sep="\t",
        compression={"method": "gzip", "compresslevel": 9, "mtime": 0},
    )

    # spot table and clusters: unchanged copies
    spots_src = her2st_dir / "spots" / f"{section}_selection.tsv"
    shutil.copyfile(spots_src, out / "spots.tsv")
    clusters_src = her2st_dir / "clusters" / f"{section}-cluster-annotation.tsv.gz"
    if clusters_src.exists():
        shutil.copyfile(clusters_src, out / "clusters.tsv.gz")

    # H&E: resize to TARGET_MPP
    table = read_spot_table(spots_src)
    full_mpp, _ = fit_mpp(
        table[["x", "y"]].to_numpy(float), table[["pixel_x", "pixel_y"]].to_numpy(float), 200.0
    )
    image_src = her2st_dir / str(row["image"])
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(image_src) as im:
        full_w, full_h = im.size
        factor = full_mpp / TARGET_MPP
        size = (round(full_w * factor), round(full_h * factor))
        small_im = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    small_im.save(out / "he.jpg", "JPEG", quality=QUALITY, optimize=True)
    image_scale = (size[0] / full_w + size[1] / full_h) / 2

    meta = {
        "section": section,
        "patient": str(row["patient"]),
        "image_scale": image_scale,
        "full_resolution_size": [full_w, full_h],
        "full_resolution_mpp": full_mpp,
        "image_size": list(size),
        "source": "https://github.com/almaan/her2st (Andersson et al., Nat Commun 2021)",
        "sources": {
            "counts.tsv.gz": {"from": f"counts/{section}.tsv.gz", "sha256": _sha256(counts_src)},
            "spots.tsv": {"from": f"spots/{section}_selection.tsv", "sha256": _sha256(spots_src)},
            "he.jpg": {"from": str(row["image"]), "sha256": _sha256(image_src)},
            "clusters.tsv.gz": {"from": f"clusters/{section}-cluster-annotation.tsv.gz"},
        },
        "genes": {"n_hvg785": int(in_hvg.sum()), "n_top_others": int(len(others))},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(
        _README.format(
            section=section,
            n_spots=len(small),
            n_genes=small.shape[1],
            n_genes_all=counts.shape[1],
            n_hvg=int(in_hvg.sum()),
            n_top=len(others),
            full_w=full_w,
            full_h=full_h,
            full_mpp=full_mpp,
            w=size[0],
            h=size[1],
            mpp=TARGET_MPP,
            quality=QUALITY,
        )
    )
    total = sum(f.stat().st_size for f in out.iterdir())
    logger.info("wrote %s (%.2f MB)", out, total / 1e6)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_src = (
        Path(__file__).resolve().parents[4] / "shared" / "data" / "her2st"
    )  # <repo>/../shared
    parser.add_argument(
        "her2st_dir", nargs="?", default=str(default_src), help="her2st data folder"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (replaced)")
    parser.add_argument("--section", default=SECTION)
    args = parser.parse_args(argv)
    logger.setLevel("INFO")
    make_example(Path(args.her2st_dir), Path(args.out), section=args.section)


if __name__ == "__main__":  # pragma: no cover
    main()
