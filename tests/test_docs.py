"""The documentation builds with warnings as errors and lists the public API."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_docs_build_warning_free(tmp_path):
    pytest.importorskip("sphinx", reason="install the test extra: pip install -e '.[test]'")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (out / "api.html").read_text()
    import squall_sd

    constants = {"DEFAULTS", "PHASES", "SIGNATURES"}
    for ns in ["io", "pp", "models", "train", "tl", "pl", "datasets"]:
        for name in getattr(squall_sd, ns).__all__:
            if name not in constants:
                assert f"{ns}.{name}" in api, f"squall.{ns}.{name} missing from the API page"
    shutil.rmtree(DOCS / "generated", ignore_errors=True)


def test_readme_images_exist():
    """Every local image of README.md is in the repository (a missing one shows as a broken image on GitHub)."""
    import re

    root = DOCS.parent
    text = (root / "README.md").read_text()
    refs = re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    refs += re.findall(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", text)
    local = [r for r in refs if not re.match(r"^[a-z][a-z0-9+.-]*:", r, flags=re.I)]
    assert local, "README.md references no local image; update this test if that is intended"
    missing = [r for r in local if not (root / r.split("#")[0]).is_file()]
    assert not missing, f"README.md shows images that are not in the repository: {missing}"
