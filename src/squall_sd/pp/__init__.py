"""squall_sd.pp."""
