"""`squall demo`: writes the zarr store and the overview PNG from the bundled example."""

from __future__ import annotations

import numpy as np
import spatialdata as sd
from PIL import Image

from squall_sd.cli import main


def test_demo_writes_store_and_png(tmp_path):
    out, png = tmp_path / "d.zarr", tmp_path / "d.png"
    assert main(["demo", "--out", str(out), "--png", str(png)]) == 0
    assert out.is_dir() and png.is_file()
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 300
        rgb = np.asarray(im.convert("RGB"), dtype=float)
    assert rgb.std() > 10  # not a blank figure
    back = sd.read_zarr(out)
    adata = back.tables["table"]
    assert adata.n_obs == 187 and "total_counts" in adata.obs
    assert back.attrs["squall"]["section"] == "C2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "d.zarr"]  # no temp files

    # a second run refuses to overwrite, and leaves both files alone
    mtime = png.stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--png", str(tmp_path / "other.png")]) == 2
    assert main(["demo", "--out", str(tmp_path / "other.zarr"), "--png", str(png)]) == 2
    assert png.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "d.zarr"]
