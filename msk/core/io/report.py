"""msk's one look for HTML: the style sheet ``msk.css`` beside this module and a page around a body.

The cluster review app (``msk clusters review``) links the style sheet; the reports that msk
writes as files (the sorter's ``report.html``, the recommender's retrieval gallery) inline it with
:func:`html_page`, so that they open from disk, without a server, and look like the app.
"""

from __future__ import annotations

import html
from pathlib import Path

__all__ = ["STYLE_FILE", "html_page", "style"]

#: the style sheet of every msk page
STYLE_FILE = Path(__file__).with_name("msk.css")


def style() -> str:
    """The text of :data:`STYLE_FILE`."""
    return STYLE_FILE.read_text(encoding="utf-8")


def html_page(title: str, body: str, *, what: str = "report", subtitle: str = "") -> str:
    """A standalone HTML page: msk's header bar (``what``, ``subtitle``), then ``body`` (HTML,
    already escaped) in a ``main.report`` column; ``title`` is escaped here."""
    esc = html.escape
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>msk · {esc(title)}</title>
<style>
{style()}</style>
</head>
<body>
<header class="bar"><span class="brand">msk</span> <span class="what">{esc(what)}</span>
<span class="dim">{esc(subtitle)}</span></header>
<main class="report">
<h1>{esc(title)}</h1>
{body}
</main>
</body>
</html>
"""
