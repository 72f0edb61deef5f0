"""Image-comparison and behaviour tests of the static plots (spatialdata-plot / matplotlib)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes

import squall_sd as squall


# ---------------------------------------------------------------------------------------------
# image comparisons (one per function; fixture data, see conftest._fill_squall_outputs)
# ---------------------------------------------------------------------------------------------
def test_plot_expression(sdata, check_figure):
    axes = squall.pl.expression(sdata, ["ERBB2", "CD74"], measured_layer="log1p")
    assert axes.shape == (2, 2)
    assert [a.get_title() for a in axes.ravel()] == [
        "ERBB2 predicted",
        "ERBB2 measured",
        "CD74 predicted",
        "CD74 measured",
    ]
    # the panels are in microns: the spots of the example lie 1.5-5.5 mm from the origin
    x0, x1 = axes[0, 0].get_xlim()
    assert 1000 < x0 < x1 < 6000
    check_figure("expression")


def test_plot_niches(sdata, check_figure):
    ax = squall.pl.niches(sdata)
    assert isinstance(ax, Axes)
    check_figure("niches")


def test_plot_niches_anndata_groups(sdata, check_figure):
    ax = squall.pl.niches(sdata.tables["table"], groups=["0", "4"])
    assert isinstance(ax, Axes)
    check_figure("niches_anndata_groups")


def test_plot_signatures(sdata, check_figure):
    axes = squall.pl.signatures(sdata, ["tls", "sig_her2_amplicon"])
    assert [a.get_title() for a in axes] == ["tls", "her2_amplicon"]
    check_figure("signatures")


def test_plot_trajectory(sdata, check_figure):
    ax = squall.pl.trajectory(sdata, show_image=False)
    assert ax.get_title() == "squall_pseudotime"
    check_figure("trajectory")


def test_plot_predicted_vs_measured(sdata, check_figure):
    adata = sdata.tables["table"].copy()
    summary = squall.tl.evaluate_expression(
        adata, measured="log1p", predicted="squall"
    )  # the real tool
    axes = squall.pl.predicted_vs_measured(adata, genes=["ERBB2", "CD74"], measured_layer="log1p")
    assert len(axes) == 3
    assert (
        axes[0].get_title()
        == f"{summary['n_genes']} genes, median r = {summary['median_pearson']:.2f}"
    )
    check_figure("predicted_vs_measured")


def test_plot_predicted_vs_measured_bar(sdata, check_figure):
    axes = squall.pl.predicted_vs_measured(
        sdata, summary="bar", n_top=10, n_genes=1, measured_layer="log1p"
    )
    assert len(axes) == 2
    assert len(axes[0].patches) == 10
    check_figure("predicted_vs_measured_bar")


# ---------------------------------------------------------------------------------------------
# behaviour
# ---------------------------------------------------------------------------------------------
def test_expression_ax_and_save(sdata, tmp_path):
    fig, axs = plt.subplots(1, 2)
    out = tmp_path / "expr.png"
    axes = squall.pl.expression(sdata, "ERBB2", ax=axs, save=out, show_image=False)
    assert axes.shape == (1, 2)
    assert axes[0, 0] is axs[0]
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="needs 2 axes"):
        squall.pl.expression(sdata, "ERBB2", ax=axs[0], show_image=False)


def test_expression_prediction_table_without_measurements(sdata):
    """A ``squall_expression`` table (predictions in X) is found without keys."""
    from spatialdata import SpatialData

    from squall_sd.pl._spatial import find_prediction

    t = sdata.tables["table"]
    pred = t[:, :5].copy()
    pred.X = np.asarray(t.layers["squall"][:, :5])
    for key in ("squall", "log1p"):
        del pred.layers[key]
    only = SpatialData(
        images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"squall_expression": pred}
    )
    src = find_prediction(only, table_key=None, layer="squall")
    assert (src.table_key, src.layer) == ("squall_expression", None)
    axes = squall.pl.expression(only, [str(pred.var_names[0])], show_image=False)
    assert axes.shape == (1, 1)  # no measured expression on this slide


def test_expression_errors(sdata, bare):
    with pytest.raises(KeyError, match="predict_expression"):
        squall.pl.expression(bare, "ERBB2")
    with pytest.raises(KeyError, match="not in table"):
        squall.pl.expression(sdata, "NOT_A_GENE")
    unpredicted = str(sdata.tables["table"].var_names[-1])
    with pytest.raises(ValueError, match="does not predict it"):
        squall.pl.expression(sdata, unpredicted, show_image=False)


def test_obs_plot_errors(bare):
    with pytest.raises(KeyError, match="tl.niches"):
        squall.pl.niches(bare)
    with pytest.raises(KeyError, match="score_signatures"):
        squall.pl.signatures(bare)
    with pytest.raises(KeyError, match="tl.trajectory"):
        squall.pl.trajectory(bare)
    with pytest.raises(ValueError, match="'hist' or 'bar'"):
        squall.pl.predicted_vs_measured(bare.tables["table"], summary="pie")


def test_with_tools(example_copy):
    """The plots on the outputs of the real tools (niches, signatures, trajectory, evaluation)."""
    import scanpy as sc

    sdata = example_copy
    adata = sdata.tables["table"]
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10, random_state=0)
    squall.tl.niches(adata, n_niches=4)
    squall.tl.score_signatures(
        adata, {"her2": ["ERBB2", "GRB7", "PGAP3"], "mhc2": ["CD74", "HLA-DRA", "HLA-DRB1"]}
    )
    squall.tl.trajectory(adata, root=0)
    assert isinstance(squall.pl.niches(sdata, show_image=False), Axes)
    assert len(squall.pl.signatures(sdata, show_image=False)) == 2
    assert isinstance(squall.pl.trajectory(adata), Axes)
