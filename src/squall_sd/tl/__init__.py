"""Tools: virtual expression from H&E, embeddings, niches, signatures, trajectories and outcome."""

from squall_sd.tl._embed import embed
from squall_sd.tl._evaluate import evaluate_expression
from squall_sd.tl._niches import niche_enrichment, niches
from squall_sd.tl._outcome import OutcomeModel, concordance_index, fit_outcome, predict_outcome
from squall_sd.tl._predict import predict_expression
from squall_sd.tl._signatures import SIGNATURES, score_signatures
from squall_sd.tl._trajectory import trajectory

__all__ = [
    "SIGNATURES",
    "OutcomeModel",
    "concordance_index",
    "embed",
    "evaluate_expression",
    "fit_outcome",
    "niche_enrichment",
    "niches",
    "predict_expression",
    "predict_outcome",
    "score_signatures",
    "trajectory",
]
