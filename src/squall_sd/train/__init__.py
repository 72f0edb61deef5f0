"""squall_sd.train."""
