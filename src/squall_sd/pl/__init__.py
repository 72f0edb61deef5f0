"""squall_sd.pl."""
