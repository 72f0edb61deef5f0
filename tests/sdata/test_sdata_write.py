"""The one write path (``squall_sd._sdata._write``): temp sibling, move into place, roll back on failure."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData

from squall_sd._sdata import _write
from squall_sd._sdata._write import add_elements, move_into_place, snapshot_table, staged


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_staged_writes_a_new_folder_and_replaces_an_old_one(tmp_path):
    target = tmp_path / "model"
    with staged(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    with staged(target) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert _files(target) == ["b.txt"]
    assert _files(tmp_path) == ["model"]  # no temp or backup folder left


def test_staged_failure_leaves_the_old_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half"), staged(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("half written")
    assert (target / "a.txt").read_text() == "old"
    assert _files(tmp_path) == ["model"]


def test_staged_single_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with staged(target, mkdir=False) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and _files(tmp_path) == ["config.yaml"]


def test_move_into_place_rolls_back_when_the_move_fails(tmp_path, monkeypatch):
    target, tmp = tmp_path / "t", tmp_path / "new"
    target.mkdir()
    (target / "x").write_text("old")
    tmp.mkdir()
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the old one is aside, the new one fails to move in
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(_write.os, "replace", flaky)
    with pytest.raises(OSError, match="disk gone"):
        move_into_place(tmp, target)
    assert (target / "x").read_text() == "old"


def _table(n=4):
    t = ad.AnnData(np.ones((n, 2), dtype=np.float32), var=pd.DataFrame(index=["a", "b"]))
    t.uns["squall"] = {"x": {"y": 1}}
    return t


def test_snapshot_table_restores_what_was_there():
    t = _table()
    t.layers["keep"] = np.zeros((4, 2))
    restore = snapshot_table(t, layers=["keep", "new"], obsm=["X_new"], var=["flag"], uns=["squall"])
    t.layers["keep"] = np.ones((4, 2))
    t.layers["new"] = np.ones((4, 2))
    t.obsm["X_new"] = np.ones((4, 3))
    t.var["flag"] = True
    t.uns["squall"]["x"]["y"] = 2
    restore()
    assert set(t.layers) == {"keep"} and (t.layers["keep"] == 0).all()
    assert "X_new" not in t.obsm and "flag" not in t.var
    assert t.uns["squall"] == {"x": {"y": 1}}


def test_add_elements_in_memory_only_and_rollback(tmp_path, monkeypatch):
    old = _table()
    sdata = SpatialData(tables={"old": old})
    add_elements(sdata, {"tables": {"new": _table(3)}}, write_to_store=None)  # not backed: memory only
    assert set(sdata.tables) == {"old", "new"}
    with pytest.raises(ValueError, match="not backed"):
        add_elements(sdata, {"tables": {"other": _table(2)}}, write_to_store=True)
    assert set(sdata.tables) == {"old", "new"}  # the failed call put sdata back

    undone = []

    def failing(*args, **kwargs):
        raise OSError("store broke")

    monkeypatch.setattr(_write, "write_elements", failing)
    with pytest.raises(OSError, match="store broke"):
        add_elements(
            sdata, {"tables": {"new": _table(5), "newer": _table(1)}}, undo=[lambda: undone.append(1)],
            write_to_store=True,
        )
    assert set(sdata.tables) == {"old", "new"} and sdata.tables["new"].n_obs == 3
    assert undone == [1]
