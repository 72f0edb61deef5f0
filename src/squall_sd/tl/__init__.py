"""squall_sd.tl."""
