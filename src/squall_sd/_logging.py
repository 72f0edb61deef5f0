"""The ``squall`` logger.

All messages of the package go through :data:`logger` (``logging.getLogger("squall")``);
set its level with ``squall.logger.setLevel("INFO")`` or the ``SQUALL_LOGLEVEL`` environment
variable. The package never prints.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("squall")

if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s squall: %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
logger.setLevel(os.environ.get("SQUALL_LOGLEVEL", "WARNING").upper())
