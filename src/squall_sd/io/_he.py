"""H&E-only slides (TIFF / OME-TIFF / SVS / NDPI / JPEG / PNG) as a lazily read multiscale image."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from spatialdata import SpatialData

from squall_sd._constants import IMAGE_KEY, MICRONS
from squall_sd._logging import logger
from squall_sd._sdata import check_path, microns_scale, validate_mpp
from squall_sd.io._common import IMAGE_CHUNK, image_element, make_sdata, pyramid_scale_factors, set_attrs

#: File suffixes read with tifffile (lazily, tile by tile, including the file's own pyramid).
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
#: File suffixes decoded with Pillow (lazily: nothing is decoded until the pixels are computed).
PIL_SUFFIXES = (".jpg", ".jpeg", ".png")
#: µm/px read from metadata outside this range is treated as a placeholder and ignored.
_PLAUSIBLE_MPP = (0.05, 100.0)
#: µm per unit of the TIFF ``ResolutionUnit`` tag (1: none, 2: inch, 3: centimetre; 4/5 from tifffile's extensions).
_RESUNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
#: µm per unit of an OME ``PhysicalSizeXUnit``.
_OME_UNIT_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
}


@dataclass
class LazyImage:
    """A slide opened without decoding pixels: its levels as (y, x, c) dask arrays and its µm/px if known.

    Attributes
    ----------
    levels
        Full resolution first, then the file's own pyramid levels (if any), each (y, x, c).
    mpp
        µm per pixel of the full-resolution level read from the file, or ``None``.
    mpp_source
        Where ``mpp`` came from (e.g. ``"OME PhysicalSizeX"``), or ``None``.
    path
        The file.
    extra
        Other metadata worth recording (format, objective power, ...).

    """

    levels: list[da.Array]
    mpp: float | None
    mpp_source: str | None
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape_yx(self) -> tuple[int, int]:
        """(height, width) of the full-resolution level in pixels."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])


def _plausible(mpp: float | None, source: str, path: Path) -> float | None:
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return None
    lo, hi = _PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        logger.warning(
            "ignoring %s of %s: %.4g µm/px is outside the plausible range %s–%s µm/px (a placeholder?)",
            source,
            path.name,
            mpp,
            lo,
            hi,
        )
        return None
    return float(mpp)


# --------------------------------------------------------------------------------------------- PIL
def _pil_decode(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a JPEG/PNG to a (y, x, 3) uint8 array, optionally resized to ``size`` = (width, height).

    Called only when dask computes. For a reduced ``size`` a JPEG is decoded directly at a reduced
    scale (libjpeg DCT scaling), so coarse pyramid levels cost a fraction of a full decode.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if size is not None and tuple(size) != im.size:
                im.draft("RGB", tuple(size))  # no-op for non-JPEG
            rgb = im.convert("RGB")
    if size is not None and rgb.size != tuple(size):
        rgb = rgb.resize(tuple(size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.asarray(rgb)


def _open_pil(path: Path) -> LazyImage:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
                fmt = im.format
        except Image.DecompressionBombError as e:  # pragma: no cover - > 2 x 89 Mpx JPEG
            raise ValueError(
                f"{path.name} is too large for a JPEG/PNG reader ({e}). Convert it to a tiled pyramidal "
                "TIFF (e.g. `vips tiffsave in.jpg out.tif --tile --pyramid --compression jpeg`) and read that."
            ) from None
        except OSError as e:
            raise ValueError(f"Could not read {str(path)!r} as an image: {e}") from None
    # one delayed decode per pyramid level (factor 2), each decoding only what it needs
    levels = []
    for k in range(len(pyramid_scale_factors((height, width))) + 1):
        size = (max(1, width >> k), max(1, height >> k))
        task = dask.delayed(_pil_decode, pure=True)(str(path), None if k == 0 else size)
        levels.append(da.from_delayed(task, shape=(size[1], size[0], 3), dtype=np.uint8))
    # JPEG/PNG resolution fields are nearly always screen placeholders (72/96 dpi), so they are not trusted.
    return LazyImage(levels=levels, mpp=None, mpp_source=None, path=path, extra={"format": fmt})


# ------------------------------------------------------------------------------------------ tifffile
def _ome_mpp(tif: Any) -> float | None:
    import tifffile

    try:
        meta = tifffile.xml2dict(tif.ome_metadata)
        image = meta["OME"]["Image"]
        image = image[0] if isinstance(image, list) else image
        pixels = image["Pixels"]
        size = pixels.get("PhysicalSizeX")
        if size is None:
            return None
        unit = str(pixels.get("PhysicalSizeXUnit", "µm"))
        return float(size) * _OME_UNIT_UM.get(unit, 1.0)
    except Exception as e:  # noqa: BLE001 - malformed OME-XML: fall through to other sources
        logger.info("could not parse OME-XML of %s: %s", tif.filehandle.name, e)
        return None


def _svs_mpp(tif: Any) -> tuple[float | None, dict[str, Any]]:
    desc = tif.pages[0].description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    extra: dict[str, Any] = {}
    mag = re.search(r"\bAppMag\s*=\s*([0-9.]+)", desc)
    if mag:
        extra["objective_power"] = float(mag.group(1))
    return (float(match.group(1)) if match else None), extra


def _resolution_mpp(page: Any) -> float | None:
    """µm/px from the XResolution/ResolutionUnit tags (centimetre or inch), or ``None``."""
    try:
        unit = int(page.resolutionunit)
        xres = float(page.resolution[0])
    except Exception:  # noqa: BLE001 - tags missing
        return None
    if unit not in _RESUNIT_UM or xres <= 0:
        return None
    mpp = _RESUNIT_UM[unit] / xres
    if unit == 2 and mpp > 20:  # 72 / 96 / 300 dpi: a placeholder, not a scan resolution
        return None
    return mpp


def _series_levels(series: Any) -> list[da.Array]:
    """Return the levels of a tifffile series as lazy (y, x, c) dask arrays."""
    import zarr

    store = series.aszarr()
    node = zarr.open(store, mode="r")
    if hasattr(node, "keys") and not hasattr(node, "shape"):
        arrays = [node[k] for k in sorted(node.keys(), key=int)]
    else:
        arrays = [node]
    axes = series.axes
    levels = []
    for arr in arrays:
        a = da.from_zarr(arr)
        # bring to (y, x, c): keep Y, X and the sample/channel axis; take index 0 of any other axis
        index: list[Any] = []
        kept: list[str] = []
        for ax, n in zip(axes, a.shape, strict=True):
            if ax in "YXSC":
                index.append(slice(None))
                kept.append(ax)
            else:
                if n > 1:
                    logger.warning(
                        "%s has %d planes along axis %r; reading the first",
                        series.parent.filehandle.name,
                        n,
                        ax,
                    )
                index.append(0)
        a = a[tuple(index)]
        chan = [ax for ax in kept if ax in "SC"]
        order = [kept.index("Y"), kept.index("X")] + [kept.index(c) for c in chan]
        a = a.transpose(order)
        if a.ndim == 4:  # both C and S: fold (rare)
            a = a.reshape(a.shape[0], a.shape[1], -1)
        levels.append(a)
    return levels


def _open_tiff(path: Path) -> LazyImage:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - tifffile raises several types for bad files
        raise ValueError(f"Could not read {str(path)!r} as a TIFF: {e}") from None
    # the slide itself is the largest series (SVS/NDPI files also hold label, macro and thumbnail images)
    series = max(
        tif.series, key=lambda s: int(np.prod([n for ax, n in zip(s.axes, s.shape, strict=True) if ax in "YX"]))
    )
    levels = _series_levels(series)
    mpp: float | None = None
    source: str | None = None
    extra: dict[str, Any] = {}
    if tif.is_ome:
        extra["format"] = "OME-TIFF"
        mpp, source = _plausible(_ome_mpp(tif), "OME PhysicalSizeX", path), "OME PhysicalSizeX"
    if mpp is None and tif.is_svs:
        extra["format"] = "SVS"
        value, more = _svs_mpp(tif)
        extra.update(more)
        mpp, source = _plausible(value, "SVS MPP", path), "SVS ImageDescription MPP"
    if mpp is None:
        page = series.pages[0] if series.pages else tif.pages[0]
        extra.setdefault("format", "NDPI" if tif.is_ndpi else "TIFF")
        mpp, source = (
            _plausible(_resolution_mpp(page), "TIFF XResolution", path),
            "TIFF XResolution/ResolutionUnit",
        )
    if mpp is None:
        source = None
    return LazyImage(levels=levels, mpp=mpp, mpp_source=source, path=path, extra=extra)


def open_lazy(path: str | os.PathLike) -> LazyImage:
    """Open an H&E image file without decoding its pixels.

    Parameters
    ----------
    path
        A TIFF / OME-TIFF / SVS / NDPI (read tile by tile with :mod:`tifffile`, including the file's own
        pyramid levels) or a JPEG / PNG (decoded on first compute, in one piece).

    Returns
    -------
    The levels as (y, x, c) dask arrays plus the µm/px found in the file's metadata.

    """
    p = check_path(path, "H&E image", kind="file")
    suffix = p.suffix.lower()
    if suffix in PIL_SUFFIXES:
        return _open_pil(p)
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(p)
    raise ValueError(
        f"Unsupported H&E image format {p.suffix!r} ({p.name}). Supported: "
        f"{', '.join(TIFF_SUFFIXES + PIL_SUFFIXES)}. Convert other formats to a pyramidal TIFF first."
    )


def lazy_image_element(
    img: LazyImage, mpp: float, *, extra_transformations: Mapping[str, Any] | None = None
):
    """Build the multiscale ``Image2DModel`` element of ``img`` with pixels → ``microns`` = ``Scale(mpp)``.

    The file's own pyramid is used when it has one (no pixels are decoded); otherwise a factor-2
    pyramid is built lazily from the full-resolution level.
    """
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation

    from squall_sd.io._common import to_cyx

    transformations = {MICRONS: microns_scale(mpp), **dict(extra_transformations or {})}
    if len(img.levels) == 1:
        return image_element(img.levels[0], transformations)
    levels = [to_cyx(a).rechunk((3, IMAGE_CHUNK, IMAGE_CHUNK)) for a in img.levels]
    tree = xr.DataTree.from_dict(
        {
            f"scale{i}": xr.Dataset(
                {"image": xr.DataArray(a, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})}
            )
            for i, a in enumerate(levels)
        }
    )
    set_transformation(tree, transformations, set_all=True)
    Image2DModel().validate(tree)
    return tree


def he(
    path: str | os.PathLike, *, mpp: float | None = None, image_key: str = IMAGE_KEY
) -> SpatialData:
    """Read an H&E-only slide as a SpatialData holding one lazily read multiscale image.

    Parameters
    ----------
    path
        Whole-slide image: TIFF, OME-TIFF, SVS, NDPI (read tile by tile through :mod:`tifffile`, using
        the file's own pyramid levels) or JPEG / PNG (decoded only when pixels are first needed).
    mpp
        µm per pixel of the full-resolution image. Read from the file when ``None``: OME
        ``PhysicalSizeX``, the SVS ``MPP`` field, or the TIFF ``XResolution`` tag with
        ``ResolutionUnit`` centimetre (inch only when it is a real scan resolution, not 72/96/300 dpi).
        JPEG/PNG carry no trustworthy µm/px, so ``mpp=`` is required for them. A given ``mpp`` wins
        over the metadata.
    image_key
        Name of the image element.

    Returns
    -------
    SpatialData with the image ``image_key`` (channels r, g, b) registered in the ``"microns"``
    coordinate system, and ``sdata.attrs["squall"]`` holding ``mpp`` and provenance.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the format is not supported, or no µm/px is known (pass ``mpp=``).

    """
    img = open_lazy(path)
    if mpp is not None:
        mpp = validate_mpp(mpp)
        if img.mpp is not None and abs(mpp - img.mpp) / img.mpp > 0.05:
            logger.warning(
                "mpp=%.4g given for %s, but its %s says %.4g µm/px; using the given value",
                mpp,
                img.path.name,
                img.mpp_source,
                img.mpp,
            )
        source = "argument"
    else:
        if img.mpp is None:
            validate_mpp(None, source=f"{img.path.name} (no µm/px in its metadata)")
        mpp, source = img.mpp, img.mpp_source
    element = lazy_image_element(img, mpp)
    sdata = make_sdata(image=element, image_key=image_key)
    height, width = img.shape_yx
    logger.info("read %s: %d x %d px at %.4g µm/px (%s)", img.path.name, width, height, mpp, source)
    return set_attrs(
        sdata,
        mpp=mpp,
        technology="he",
        image_key=image_key,
        mpp_source=source,
        source_file=str(img.path),
        reader="squall_sd.io.he",
        **img.extra,
    )
