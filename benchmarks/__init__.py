"""Device checks run by hand on a GPU machine (see ``gpu_check.sh``); not installed."""
