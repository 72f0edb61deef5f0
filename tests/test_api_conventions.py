"""The public API follows one set of conventions (in the spirit of scanpy's API tests).

For every public function and class of ``squall_sd.pp``, ``.tl``, ``.pl``, ``.io``, ``.train`` and
``.datasets`` (their ``__all__``):

- every option after the leading data / required arguments is keyword-only;
- a parameter naming an output is ``key_added`` or ``*_key_added``;
- a function writing into an AnnData / SpatialData offers ``copy`` or ``inplace``;
- a progress bar switch is called ``progress``;
- a boolean flag has a boolean default;
- every parameter is described in the numpy docstring's ``Parameters`` section.

Exceptions are listed below, each with its reason.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Iterator

import pytest

NAMESPACES = ("pp", "tl", "pl", "io", "train", "datasets")

# Optional positional arguments that are data, not options (what to score / plot / read).
DATA_ARGS = {
    "tl.score_signatures": {"signatures"},
    "pl.signatures": {"keys"},
    "io.legacy_st": {"image"},
    # an array function used like numpy's (`normalize_expression(X, "binary")`), not an AnnData tool
    "pp.normalize_expression": {"method"},
    # which image to read is data (`get_mpp(sdata, "he")`), like `sdata.images[key]`
    "io.get_mpp": {"image_key"},
    # train: small building blocks used like torch / numpy functions
    "train.GatedAttentionMIL": {"hidden_dim", "n_outputs", "dropout"},
    "train.info_nce": {"temperature"},
    "train.load_config": {"config", "overrides"},
    "train.param_groups": {"lr_scale"},
}

# Parameters that name outputs without being `key_added` / `*_key_added`.
OUTPUT_NAMES = {
    # a prefix of several output columns (one per signature), read back by pl.signatures
    "tl.score_signatures": {"key_prefix"},
    "pl.signatures": {"key_prefix"},
    "io.legacy_st": {"spots_key"},  # names an element of the new SpatialData a reader returns
}

# Functions that write into their input without offering `copy` / `inplace`.
WRITES_WITHOUT_COPY: set[str] = set()

# Progress switches not (yet) called `progress`.
PROGRESS_NAMES = {
    "train.prepare": {"show_progress"},  # r13-merge: fixed in another branch
}

# Parameters not described in the docstring.
UNDOCUMENTED: dict[str, set[str]] = {
    "train.AlignModule": {"model", "cfg"},
    "train.ImagePretrainModule": {"model", "cfg"},
    "train.expression_grid": {"batch", "n_genes"},
}

_WRITES = re.compile(
    r"\.(obs|obsm|obsp|var|varm|varp|uns|layers|tables|shapes|images|labels|points)\[[^\]\n]+\]\s*=[^=]"
)
_OUTPUT_NAME = re.compile(r"(_added$|^out_key$|^key_out$|^output_key$|_prefix$|^key_name$)")
_PROGRESS = re.compile(r"progress|verbose_bar|pbar")


def _public() -> Iterator[tuple[str, Callable]]:
    for ns in NAMESPACES:
        module = importlib.import_module(f"squall_sd.{ns}")
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not (inspect.isclass(obj) and dataclasses.is_dataclass(obj)):
                yield f"{ns}.{name}", obj


PUBLIC = dict(_public())


def _params(obj: Callable) -> list[inspect.Parameter]:
    """Parameters of ``obj`` (its ``__init__`` for a class), without ``self`` and private ones."""
    params = list(inspect.signature(obj).parameters.values())
    return [p for p in params if p.name != "self" and not p.name.startswith("_")]


def _takes_data(obj: Callable) -> bool:
    """Whether the first parameter of ``obj`` is an AnnData or a SpatialData."""
    params = _params(obj)
    ann = str(params[0].annotation) if params else ""
    return "AnnData" in ann or "SpatialData" in ann


def _documented(obj: Callable) -> set[str]:
    """Names in the ``Parameters`` section of the (rendered) numpy docstring of ``obj``."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    if inspect.isclass(obj) and obj.__init__.__doc__:
        doc += "\n\n" + inspect.cleandoc(obj.__init__.__doc__)
    m = re.search(r"^Parameters\n-+\n(.*?)(?=^\S[^\n]*\n-{3,}\n|\Z)", doc, re.S | re.M)
    if not m:
        return set()
    names: set[str] = set()
    for line in m.group(1).splitlines():
        if line and not line[0].isspace():
            for part in line.split(":")[0].split(","):
                names.add(part.strip().lstrip("*"))
    return names


def test_public_api_is_found():
    assert "tl.predict_expression" in PUBLIC
    assert "pl.napari" in PUBLIC
    assert len(PUBLIC) > 50


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_options_are_keyword_only(name):
    allowed = DATA_ARGS.get(name, set())
    bad = [
        p.name
        for p in _params(PUBLIC[name])
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty and p.name not in allowed
    ]
    assert not bad, f"{name}: options {bad} should be keyword-only (after `*`)"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_output_names_are_key_added(name):
    allowed = OUTPUT_NAMES.get(name, set())
    bad = [
        p.name
        for p in _params(PUBLIC[name])
        if _OUTPUT_NAME.search(p.name)
        and not (p.name == "key_added" or p.name.endswith("_key_added"))
        and p.name not in allowed
    ]
    assert not bad, f"{name}: {bad} name outputs: call them `key_added` or `<what>_key_added`"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_writers_offer_copy_or_inplace(name):
    obj = PUBLIC[name]
    if inspect.isclass(obj) or not _takes_data(obj) or name in WRITES_WITHOUT_COPY:
        return
    names = {p.name for p in _params(obj)}
    if "key_added" in names or any(n.endswith("_key_added") for n in names):
        writes = True  # an output written into the input
    else:
        try:
            writes = bool(_WRITES.search(inspect.getsource(obj)))
        except (OSError, TypeError):
            writes = False
    if writes:
        assert {"copy", "inplace"} & names, f"{name} writes into its input: offer `copy=` or `inplace=`"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_progress_is_called_progress(name):
    allowed = PROGRESS_NAMES.get(name, set())
    bad = [p.name for p in _params(PUBLIC[name]) if _PROGRESS.search(p.name) and p.name != "progress"]
    assert not [b for b in bad if b not in allowed], f"{name}: call the progress switch `progress`, not {bad}"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_flags_have_boolean_defaults(name):
    bad = []
    for p in _params(PUBLIC[name]):
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        if ann == "bool" and p.default is not p.empty and not isinstance(p.default, bool):
            bad.append(p.name)
        if isinstance(p.default, bool) and ann and "bool" not in ann and ann != "Any":
            bad.append(p.name)
    assert not bad, f"{name}: {bad} are flags: annotate them `bool` with a `True` / `False` default"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_parameters_are_documented(name):
    obj = PUBLIC[name]
    documented = _documented(obj)
    params = {p.name for p in _params(obj)}
    missing = sorted(params - documented - UNDOCUMENTED.get(name, set()))
    assert not missing, f"{name}: parameters {missing} are not in the docstring's Parameters section"


def test_exceptions_are_current():
    """Every exception above names a public function and one of its parameters (remove stale ones)."""
    for table in (DATA_ARGS, OUTPUT_NAMES, PROGRESS_NAMES, UNDOCUMENTED):
        for name, params in table.items():
            assert name in PUBLIC, f"{name} is not public any more: remove its exception"
            stale = params - {p.name for p in _params(PUBLIC[name])}
            assert not stale, f"{name} has no parameters {sorted(stale)} any more: remove the exception"
    for name, params in UNDOCUMENTED.items():
        now = params & _documented(PUBLIC[name])
        assert not now, f"{name}: {sorted(now)} are documented now: remove the exception"
    for name in WRITES_WITHOUT_COPY:
        assert not {"copy", "inplace"} & {p.name for p in _params(PUBLIC[name])}, f"remove {name}'s exception"
