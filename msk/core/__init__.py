"""Core of msk: hook specifications, registry, I/O, datasets, training loops, metrics, CLI."""
