"""Built-in plugins. Each module implements hooks of :mod:`msk.core.hookspecs` exactly as a
third-party plugin would, and is listed in :data:`msk.core.registry.DEFAULT_PLUGINS`."""
