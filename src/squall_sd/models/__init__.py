"""squall_sd.models."""
