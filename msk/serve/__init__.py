"""``msk serve``: the sorter, the recommender and the fusion classifier as a versioned HTTP API on
Ray Serve (see ``docs/serve.md``).

* :mod:`msk.serve.config`: :class:`ServeConfig`, the YAML that names checkpoints and index;
* :mod:`msk.serve.app`: the FastAPI gateway, :func:`serve_main` and the Serve app builder;
* :mod:`msk.serve.sorter`, :mod:`msk.serve.recommender`, :mod:`msk.serve.classifier`: the model
  deployments (``@serve.batch``);
* :mod:`msk.serve.inputs`, :mod:`msk.serve.auth`, :mod:`msk.serve.errors`: uploads, Bearer
  tokens and the JSON error contract.

Importing this package is cheap; Ray Serve and torch load when an entry point is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "application", "build_app", "serve_main"]


def __getattr__(name: str) -> Any:
    if name == "ServeConfig":
        from msk.serve.config import ServeConfig

        return ServeConfig
    if name in ("application", "build_app", "serve_main"):
        from msk.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'msk.serve' has no attribute {name!r}")
