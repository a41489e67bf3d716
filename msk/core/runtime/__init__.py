"""Running on Ray: starting Ray, workers, run locks, orderly shutdown, progress."""
