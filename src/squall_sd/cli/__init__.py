"""The ``squall`` command line."""

from squall_sd.cli._main import main
from squall_sd.cli._predict import predict_slides, run_predict

__all__ = ["main", "predict_slides", "run_predict"]
