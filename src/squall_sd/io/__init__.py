"""squall_sd.io."""
