"""Fixtures of the plotting tests: the bundled example with squall outputs, and image comparison.

Image tests compare a figure saved at ``DPI`` with ``tests/pl/_images/<name>.png`` using
:func:`matplotlib.testing.compare.compare_images` (RMS tolerance ``TOL``). Set
``SQUALL_UPDATE_IMAGES=1`` to (re)write the reference images instead of comparing; look at them
before committing. Failed comparisons leave ``<name>-actual.png`` / ``-diff.png`` in
``tests/pl/_images/_failed/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

IMAGES = Path(__file__).parent / "_images"
FAILED = IMAGES / "_failed"
#: Figures are saved at this DPI for comparison (small files, fast comparisons).
DPI = 40
#: RMS tolerance of :func:`matplotlib.testing.compare.compare_images` (0-255 scale).
TOL = 10
UPDATE = os.environ.get("SQUALL_UPDATE_IMAGES", "") not in ("", "0")

#: The genes the fixture marks as not predicted (NaN in the prediction layer).
UNPREDICTED = slice(900, None)


def _fill_squall_outputs(sdata) -> None:
    """Write deterministic stand-ins of squall tool outputs into the example's table (TEST DATA).

    - ``layers["squall"]``: NOT a model prediction: the log1p-CP10k measured expression averaged
      over each spot and its 6 nearest neighbours (a smooth, deterministic function of the
      measurements), NaN for the last genes, which ``var["squall_predicted"]`` marks as unpredicted;
    - ``layers["log1p"]``: log1p-CP10k measured expression;
    - ``obs["squall_niche"]``: the authors' expression clusters (``her2st_cluster``);
    - ``obs["sig_*"]``: means of fixed gene sets; ``obs["squall_pseudotime"]``: scaled x position.

    Real tool outputs (``squall.tl.*``) are exercised in ``test_with_tools``; the image tests use
    these so that the reference PNGs do not depend on BLAS / clustering details.
    """
    from scipy.spatial import cKDTree

    t = sdata.tables["table"]
    counts = t.X.toarray().astype(float)
    lg = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    xy = np.asarray(t.obsm["spatial"], dtype=float)
    _, idx = cKDTree(xy).query(xy, k=7)
    pred = lg[idx].mean(1).astype(np.float32)
    pred[:, UNPREDICTED] = np.nan
    t.layers["squall"] = pred
    t.layers["log1p"] = lg.astype(np.float32)
    t.var["squall_predicted"] = np.isfinite(pred).all(0)
    t.obs["squall_niche"] = pd.Categorical(
        t.obs["her2st_cluster"].astype(str).replace("nan", np.nan)
    )
    genes = list(t.var_names)
    t.obs["sig_tls"] = lg[
        :, [genes.index(g) for g in ("CD74", "HLA-DRA", "CXCL13", "CCL19") if g in genes]
    ].mean(1)
    t.obs["sig_her2_amplicon"] = lg[
        :, [genes.index(g) for g in ("ERBB2", "GRB7", "PGAP3") if g in genes]
    ].mean(1)
    t.obs["squall_pseudotime"] = (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0])


@pytest.fixture(scope="session")
def _example_session():
    import squall_sd as squall

    sdata = squall.datasets.example()
    _fill_squall_outputs(sdata)
    return sdata


@pytest.fixture()
def sdata(_example_session):
    """The bundled example with stand-in squall outputs (shared; tests must not modify it)."""
    return _example_session


@pytest.fixture(scope="session")
def bare():
    """The bundled example without squall outputs (shared; tests must not modify it)."""
    import squall_sd as squall

    return squall.datasets.example()


@pytest.fixture()
def example_copy():
    """A fresh bundled example without squall outputs (for tests that run the real tools)."""
    import squall_sd as squall

    return squall.datasets.example()


@pytest.fixture()
def check_figure(request):
    """Save the current figure at ``DPI`` and compare it with ``_images/<name>.png``."""
    import matplotlib.pyplot as plt
    from matplotlib.testing.compare import compare_images

    def _check(name: str, fig=None, *, tol: float = TOL) -> None:
        fig = fig if fig is not None else plt.gcf()
        IMAGES.mkdir(exist_ok=True)
        expected = IMAGES / f"{name}.png"
        if UPDATE or not expected.exists():
            fig.savefig(expected, dpi=DPI)
            plt.close(fig)
            if not UPDATE:
                pytest.fail(
                    f"reference image {expected} did not exist; written now - check it and rerun"
                )
            return
        FAILED.mkdir(exist_ok=True)
        actual = FAILED / f"{name}-actual.png"
        fig.savefig(actual, dpi=DPI)
        plt.close(fig)
        result = compare_images(str(expected), str(actual), tol=tol, in_decorator=True)
        if result is None:
            actual.unlink(missing_ok=True)
            if not any(FAILED.iterdir()):
                shutil.rmtree(FAILED, ignore_errors=True)
            return
        pytest.fail(
            f"{name}: image differs from the reference (RMS {result['rms']:.2f} > tol {tol}); see "
            f"{result['actual']} and {result['diff']}. If the change is intended, rerun with "
            "SQUALL_UPDATE_IMAGES=1 and check the new reference."
        )

    yield _check
    plt.close("all")
