"""squall_sd.datasets."""
