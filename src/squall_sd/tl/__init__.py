"""squall_sd.tl."""

from squall_sd.tl._evaluate import evaluate_expression

__all__ = ["evaluate_expression"]
