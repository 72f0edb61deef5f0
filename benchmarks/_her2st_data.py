"""her2st data for the benchmarks: counts, spot centres, µm/px and spot-centred H&E tiles.

Sections are read with the package's reader (``squall_sd.datasets.her2st``) and tiles cut with its
patch extractor (``squall_sd.pp.extract_patches``) when those exist, so the benchmark exercises the
package; otherwise (or with ``--no-package``) ../shared/data/her2st is read directly (pandas + PIL).
Tiles and hand-made features are cached in ``benchmarks/results/cache/`` (gitignored).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

Image.MAX_IMAGE_PIXELS = None

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "her2st"
CACHE = HERE / "results" / "cache"
PITCH_UM = 200.0  # legacy ST: 100 µm spots on a 200 µm centre-to-centre pitch
SPOT_DIAMETER_UM = 100.0


@dataclass
class Section:
    """One her2st section: raw counts, spot centres and the tiles around them."""

    name: str
    patient: str
    counts: pd.DataFrame  # spots × genes, raw UMI
    centres_px: np.ndarray  # (n, 2) column, row in the image file's pixels
    image_path: Path | None
    image_mpp: float  # µm per pixel of the image file (least-squares fit)
    patches: np.ndarray | None = None  # (n, size, size, 3) uint8
    meta: dict = field(default_factory=dict)

    @property
    def total_umi(self) -> np.ndarray:
        return self.counts.to_numpy().sum(1).astype(np.float64)

    @property
    def centres_um(self) -> np.ndarray:
        return self.centres_px * self.image_mpp


def fit_mpp(spots: pd.DataFrame) -> float:
    """µm per FULL-RESOLUTION pixel: least squares of pixel coords on array coords × 200 µm."""
    design = np.column_stack([spots[["x", "y"]].to_numpy(float) * PITCH_UM, np.ones(len(spots))])
    coef, *_ = np.linalg.lstsq(design, spots[["pixel_x", "pixel_y"]].to_numpy(float), rcond=None)
    px_per_um = np.sqrt(abs(np.linalg.det(coef[:2])))
    return float(1.0 / px_per_um)


def load_section_direct(root: Path, name: str) -> Section:
    """Read counts, spot table and image location of one section straight from the files."""
    table = pd.read_csv(root / "sections.csv", index_col=0)
    row = table.loc[name]
    counts = pd.read_csv(root / "counts" / f"{name}.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(root / "spots" / f"{name}_selection.tsv", sep="\t")
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    spots = spots[~spots.index.duplicated()]
    keep = counts.index.intersection(spots.index)
    counts = counts.loc[keep]
    spots = spots.loc[keep]
    image = row["image"] if isinstance(row["image"], str) else None
    scale = float(row["coord_scale_to_image"]) if image else 1.0
    mpp_full = fit_mpp(spots)
    centres = spots[["pixel_x", "pixel_y"]].to_numpy(float) * scale
    return Section(
        name=name,
        patient=str(row["patient"]),
        counts=counts,
        centres_px=centres,
        image_path=(root / image) if image else None,
        image_mpp=mpp_full / scale,
        meta={"mpp_fullres": mpp_full, "coord_scale_to_image": scale, "reader": "direct"},
    )


def _load_section_package(root: Path, name: str) -> Section | None:
    """Read one section with ``squall_sd.datasets.her2st`` (``io.legacy_st``, then ``pp.register_spots``:
    spots that are off their tissue, as A2's in its PNG copy, are moved onto it); None while the
    reader is not available."""
    try:
        import squall_sd

        reader = getattr(squall_sd.datasets, "her2st", None)
        if reader is None:
            return None
        row = pd.read_csv(root / "sections.csv", index_col=0).loc[name]
        image = row["image"] if isinstance(row["image"], str) else None
        sdata = reader(name, root, labels=False)
    except NotImplementedError:
        return None
    adata = sdata.tables["table"]
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    counts = pd.DataFrame(x, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    mpp_img = float(sdata.attrs["squall"]["mpp"])
    centres_um = np.asarray(adata.obsm["spatial"], dtype=float)
    sec = Section(
        name=name,
        patient=str(row["patient"]),
        counts=counts,
        centres_px=centres_um / mpp_img,
        image_path=(root / image) if image else None,
        image_mpp=mpp_img,
        meta={"reader": "squall_sd.datasets.her2st", "sdata": sdata},
    )
    return sec


def load_sections(
    names: list[str], root: Path = DEFAULT_ROOT, use_package: bool = True
) -> dict[str, Section]:
    out = {}
    for name in names:
        sec = None
        if use_package:
            sec = _load_section_package(root, name)
        out[name] = sec if sec is not None else load_section_direct(root, name)
    return out


# --------------------------------------------------------------------------------------- tiles
def _tile(
    img: Image.Image, cx: float, cy: float, side_px: float, size: int, black_to_white: bool
) -> np.ndarray:
    """A ``size``² tile covering ``side_px`` image pixels centred on (cx, cy); outside → background."""
    half = side_px / 2.0
    x0, y0 = int(np.floor(cx - half)) - 2, int(np.floor(cy - half)) - 2
    x1, y1 = int(np.ceil(cx + half)) + 2, int(np.ceil(cy + half)) + 2
    crop = np.asarray(img.crop((x0, y0, x1, y1)).convert("RGB")).copy()  # outside the image: black
    if black_to_white:
        # A1/A2 PNGs have the background blacked out (and crop() pads with black): make it look like
        # the white glass of the C scans so that "background" means the same thing in both patients.
        crop[crop.max(axis=2) < 16] = 255
    box = (cx - half - x0, cy - half - y0, cx + half - x0, cy + half - y0)
    tile = Image.fromarray(crop).resize(
        (size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None
    )
    return np.asarray(tile, dtype=np.uint8)


def extract_tiles(
    sec: Section, mpp: float, size: int = 224, black_to_white: bool = True
) -> np.ndarray:
    """Spot-centred ``size``-px tiles at ``mpp`` µm/px (field of view ``size × mpp`` µm)."""
    if sec.image_path is None:
        raise ValueError(f"Section {sec.name} has no image.")
    img = Image.open(sec.image_path)
    img.load()
    side_px = size * mpp / sec.image_mpp
    return np.stack(
        [_tile(img, cx, cy, side_px, size, black_to_white) for cx, cy in sec.centres_px]
    )


def _extract_tiles_package(
    sec: Section, mpp: float, size: int, black_to_white: bool
) -> np.ndarray | None:
    """Tiles from ``squall_sd.pp.extract_patches`` when the section came from the package reader."""
    sdata = sec.meta.get("sdata")
    if sdata is None:
        return None
    try:
        import squall_sd

        extract = getattr(squall_sd.pp, "extract_patches", None)
        if extract is None:
            return None
        ds = extract(sdata, sec.centres_um, patch_px=size, mpp=mpp)
        tiles = np.asarray(ds.get_batch())
    except NotImplementedError:
        return None
    if tiles.shape[1] == 3:
        tiles = tiles.transpose(0, 2, 3, 1)
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    if black_to_white:
        tiles[tiles.max(axis=3) < 16] = 255
    return tiles


def _has_pp() -> bool:
    try:
        import squall_sd

        return hasattr(squall_sd.pp, "extract_patches")
    except ImportError:
        return False


def cache_key(
    names: list[str], mpp: float, size: int, black_to_white: bool, extra: str = "", centres=None
) -> str:
    """Short hash of everything that determines a section's tiles (with ``centres``, the spot centres:
    a change of registration, such as A2's, cuts new tiles)."""
    if centres is not None:
        extra += hashlib.sha1(np.round(np.asarray(centres, dtype=float), 3).tobytes()).hexdigest()[:10]
    payload = json.dumps([sorted(names), round(mpp, 4), size, black_to_white, extra, 3])  # 3: registered spots
    return hashlib.sha1(payload.encode()).hexdigest()[:10]


def attach_tiles(
    sections: dict[str, Section],
    mpp: float,
    size: int = 224,
    black_to_white: bool = True,
    cache: bool = True,
    log=print,
) -> float:
    """Fill ``sec.patches`` for every section with an image (cached .npz); return seconds spent."""
    t0 = time.time()
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, sec in sections.items():
        if sec.image_path is None:
            continue
        tiler = "pp" if sec.meta.get("sdata") is not None and _has_pp() else "direct"
        key = cache_key([name], mpp, size, black_to_white, sec.meta.get("reader", "") + tiler, centres=sec.centres_px)
        path = CACHE / f"her2st_{name}_{mpp:g}mpp_{size}px_{key}.npz"
        if cache and path.exists():
            z = np.load(path, allow_pickle=False)
            if list(z["spot_ids"]) == list(sec.counts.index):
                sec.patches = z["patches"]
                sec.meta["tiles"] = str(z["source"]) if "source" in z else "cache"
                continue
        t = time.time()
        tiles = _extract_tiles_package(sec, mpp, size, black_to_white)
        sec.meta["tiles"] = "squall_sd.pp" if tiles is not None else "direct (PIL bicubic)"
        if tiles is None:
            tiles = extract_tiles(sec, mpp, size, black_to_white)
        sec.patches = tiles
        if cache:
            np.savez(
                path,
                patches=tiles,
                spot_ids=np.asarray(sec.counts.index, dtype=str),
                source=np.asarray(sec.meta["tiles"]),
            )
        log(
            f"  tiles {name}: {len(tiles)} × {size}px at {mpp} µm/px from {sec.image_mpp:.3f} µm/px "
            f"({time.time() - t:.1f}s)"
        )
    return time.time() - t0


# ------------------------------------------------------------------------------ normalisation
def cp10k_log1p(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    tot = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.maximum(tot, 1.0) * 1e4)


def top_expressed(sections: dict[str, Section], names: list[str], genes, k: int = 50) -> list[str]:
    """The ``k`` genes with the highest mean CP10k+log1p over the spots of sections ``names``."""
    y = np.concatenate([normalised(sections[n], list(genes)) for n in names])
    return [genes[i] for i in np.argsort(-y.mean(0), kind="stable")[:k]]


def normalised(sec: Section, genes: list[str]) -> np.ndarray:
    """CP10k + log1p computed on ALL genes of the section, then restricted to ``genes``."""
    full = cp10k_log1p(sec.counts.to_numpy())
    idx = sec.counts.columns.get_indexer(genes)
    if np.any(idx < 0):
        raise KeyError("some genes are missing from section " + sec.name)
    return full[:, idx]


def run_sections(model_dir: Path) -> dict[str, list[str]] | None:
    """Training and validation sections of a model exported by ``squall train``, from its run's
    ``config.yaml`` (beside the model, or in the run's ``finetune/`` folder); ``None`` if there is none."""
    import yaml

    for cfg in (model_dir / "config.yaml", model_dir.parent / "finetune" / "config.yaml"):
        if cfg.is_file():
            d = yaml.safe_load(cfg.read_text()).get("data", {})
            as_list = lambda v: [] if v is None else [v] if isinstance(v, str) else list(v)  # noqa: E731
            return {k: [Path(t).name for t in as_list(d.get(k))] for k in ("train", "val")}
    return None


def emit_report(text: str, out: Path) -> None:
    """Print a markdown report and write it to ``out`` (its folder is created)."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
