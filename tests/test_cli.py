"""The ``squall`` command itself: ``--version``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import squall_sd as squall
from squall_sd.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"squall {squall.__version__}"


def test_version_console_script():
    """A fresh process (as the console script runs) prints the same and exits 0."""
    code = "import sys; from squall_sd.cli import main; sys.argv = ['squall', '--version']; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"squall {squall.__version__}"
