"""The one write path: every folder or store squall writes goes through here.

One failure rule: a result is written next to its target under a temporary name and moved into place
only once complete; an existing target is renamed aside first and restored if the move fails, so the
user's files are never half-written. Elements written into a backed SpatialData's zarr store follow
the same rule element by element (:func:`write_elements`), and :func:`add_elements` also restores the
in-memory SpatialData when writing fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad

from squall_sd._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = [
    "add_elements",
    "move_into_place",
    "snapshot_table",
    "staged",
    "table_write_settings",
    "temp_sibling",
    "write_elements",
    "write_sdata",
]


def temp_sibling(target: Path) -> Path:
    """Return a fresh hidden path next to ``target`` (``.<name>.tmp-<random>``) to write into."""
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    """Delete a file or folder (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def move_into_place(tmp: Path, target: Path) -> None:
    """Move the finished file or folder ``tmp`` to ``target``, replacing an existing ``target`` only now.

    The old ``target`` is first renamed aside, the new one renamed in, and only then the old one
    deleted, so that ``target`` is never half-written; if renaming the new one in fails, the old one
    is put back.
    """
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


@contextmanager
def staged(target: str | os.PathLike[str], *, mkdir: bool = True) -> Iterator[Path]:
    """Write ``target`` through a temporary sibling: yields the path to write, then moves it into place.

    On an error inside the ``with`` block the temporary path is deleted and ``target`` is left as it
    was (absent, or the old file / folder). ``mkdir=True`` creates the temporary folder; with
    ``mkdir=False`` the block creates the file or folder itself.

    Examples
    --------
    >>> with staged(folder) as tmp:  # doctest: +SKIP
    ...     (tmp / "config.json").write_text("{}")
    """
    target = Path(target)
    tmp = temp_sibling(target)
    if mkdir:
        tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)


@contextmanager
def table_write_settings() -> Iterator[None]:
    """Write tables with zarr v3 sharding off, explicitly, unless the user chose a sharding setting.

    SpatialData writes tables through anndata in zarr format 3. While ``anndata.settings.auto_shard_zarr_v3``
    is unset (``None``, anndata's default), anndata (0.12 here) warns *"zarr v3 autosharding will be the
    default in the next minor release."* (``UserWarning``) once for every array of every table written:
    ``squall demo`` printed 18 of them. Setting the option to ``False`` while we write avoids the warning
    at its source and keeps the layout written so far (unsharded arrays), also once anndata's default
    changes. A value the user set (``True`` or ``False``) is left alone, and so is an anndata without
    the option.
    """
    if getattr(ad.settings, "auto_shard_zarr_v3", False) is None:
        with ad.settings.override(auto_shard_zarr_v3=False):
            yield
    else:
        yield


def write_sdata(sdata: SpatialData, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to a new zarr store at ``path`` through :func:`staged` (see :func:`squall_sd.io.write`)."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{str(target)!r} already exists. Pass `overwrite=True` to replace it, or choose another path."
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(f"The folder {str(target.parent)!r} to write into does not exist.")
    with staged(target, mkdir=False) as tmp, table_write_settings():
        sdata.write(tmp, overwrite=False)
    logger.info("wrote %s", target)
    return target


def write_elements(
    sdata: SpatialData, *, new: Sequence[str], replaced: Sequence[str], write_to_store: bool | None
) -> None:
    """Write elements of ``sdata`` to its zarr store (when backed, unless disabled); roll back on failure.

    ``new`` are element names that did not exist on disk before; ``replaced`` may exist and are
    overwritten. An element already on disk is copied aside before it is deleted and rewritten. On an
    error the elements written so far are deleted and the copies put back, so the store is as it was.
    """
    backed = getattr(sdata, "path", None) is not None
    if write_to_store is None:
        write_to_store = backed
    if not write_to_store:
        return
    if not backed:
        raise ValueError("`write_to_store=True` but `sdata` is not backed by a zarr store (sdata.path is None).")
    on_disk = set(sdata.elements_paths_on_disk())
    written: list[str] = []
    backups: list[tuple[Path, Path]] = []
    tmp = Path(tempfile.mkdtemp(prefix="squall_backup_"))
    try:
        for name in [*new, *replaced]:
            rel = next((p for p in on_disk if p.split("/")[-1] == name), None)
            if rel is not None:
                # spatialdata refuses to overwrite inside its own store: back up, delete, write
                src = Path(sdata.path) / rel
                shutil.copytree(src, tmp / rel.replace("/", "__"))
                backups.append((src, tmp / rel.replace("/", "__")))
                sdata.delete_element_from_disk(name)
            with table_write_settings():  # no zarr v3 autosharding warning per table array
                sdata.write_element(name)
            written.append(name)
            logger.info("wrote %r to %s", name, sdata.path)
    except BaseException:
        for name in written:
            try:
                sdata.delete_element_from_disk(name)
            except Exception as err:  # noqa: BLE001 - best effort
                logger.warning("could not remove %r from %s after a failed write: %s", name, sdata.path, err)
        for src, bak in backups:
            if not src.exists():
                shutil.copytree(bak, src)
        try:
            sdata.write_consolidated_metadata()
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_elements(
    sdata: SpatialData,
    elements: Mapping[str, Mapping[str, Any]],
    *,
    replaced: Sequence[str] = (),
    undo: Sequence[Callable[[], None]] = (),
    write_to_store: bool | None,
) -> None:
    """Put new elements into ``sdata`` and write them (and ``replaced``) to its store, all or nothing.

    Parameters
    ----------
    sdata
        The SpatialData to add to.
    elements
        ``{"shapes" | "images" | "tables": {name: element}}``; each element is set in memory, then
        written with :func:`write_elements` as a new element (tables: as replaced ones).
    replaced
        Names of elements changed in memory already (e.g. a table that got a new layer) to rewrite.
    undo
        Callables restoring the in-memory changes behind ``replaced`` (:func:`snapshot_table`), run when
        writing fails.
    write_to_store
        See :func:`write_elements`.

    On failure the store is rolled back (:func:`write_elements`), ``sdata``'s containers get their
    previous elements back (new ones are removed), ``undo`` runs, and the error is re-raised.
    """
    before: list[tuple[str, str, Any]] = []
    for kind, items in elements.items():
        container = getattr(sdata, kind)
        for k, v in items.items():
            before.append((kind, k, container[k] if k in container else None))
            container[k] = v
    new = [k for kind in ("shapes", "images") for k in elements.get(kind, {})]
    tables = [k for k in elements.get("tables", {}) if k not in replaced]
    try:
        write_elements(sdata, new=new, replaced=[*replaced, *tables], write_to_store=write_to_store)
    except BaseException:
        # the store is as it was: put the in-memory SpatialData back as well
        for kind, k, old in reversed(before):
            container = getattr(sdata, kind)
            if old is not None:
                container[k] = old
            elif k in container:
                del container[k]
        for restore in undo:
            restore()
        raise


def snapshot_table(
    table: ad.AnnData,
    *,
    layers: Sequence[str] = (),
    obsm: Sequence[str] = (),
    var: Sequence[str] = (),
    uns: Sequence[str] = (),
) -> Callable[[], None]:
    """Return a callable that puts the named ``layers``, ``obsm``, ``var`` columns and ``uns`` keys of ``table`` back.

    Entries that did not exist are removed again; ``uns`` values are deep-copied.
    """
    import copy

    saved: list[tuple[str, str, Any]] = []
    for kind, keys in (("layers", layers), ("obsm", obsm), ("var", var), ("uns", uns)):
        mapping = getattr(table, kind)
        for k in keys:
            if k not in mapping:
                saved.append((kind, k, None))
            elif kind == "uns":
                saved.append((kind, k, copy.deepcopy(mapping[k])))
            elif kind == "var":
                saved.append((kind, k, mapping[k].copy()))
            else:
                saved.append((kind, k, mapping[k]))

    def restore() -> None:
        for kind, k, old in saved:
            mapping = getattr(table, kind)
            if old is not None:
                mapping[k] = old
            elif k in mapping:
                del mapping[k]

    return restore
