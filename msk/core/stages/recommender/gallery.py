"""The retrieval gallery of ``msk eval recommender``: test queries beside their nearest training images."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass
from msk.core.stages.recommender.data import EvalData


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


def _strip(query: np.ndarray, neighbours: list[np.ndarray], captions: list[str], *, thumb: int = 112):
    """A white contact strip: the query, a gap, its neighbours; a caption under each tile."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line = 12
    tiles = [query, *neighbours]
    gap, sep = 4, 16
    width = gap + len(tiles) * (thumb + gap) + sep
    height = gap + thumb + 3 * line + gap
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x = gap + i * (thumb + gap) + (sep if i else 0)
        image = Image.fromarray(tile).convert("L").resize((thumb, thumb), Image.Resampling.NEAREST)
        strip.paste(image, (x, gap))
        if i == 0:
            draw.rectangle([x - 1, gap - 1, x + thumb, gap + thumb], outline="black")
        for j, text in enumerate(caption.split("\n")[:3]):
            draw.text((x, gap + thumb + 1 + j * line), text[:19], fill="black", font=font)
    return strip


def write_gallery(data: EvalData, test_idx: np.ndarray, recommendations: list, out: str | os.PathLike, *,
                  title: str = "recommender", n_queries: int = 12) -> Path:
    """Contact strips (query + its neighbours) for ``n_queries`` test images, one entity after
    another, and ``index.html`` listing them with the vote and the neighbours' pseudonymised ids."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    position = {image_id: i for i, image_id in enumerate(data.image_ids)}
    by_entity: dict[str, list[int]] = {}
    for j, i in enumerate(test_idx):
        by_entity.setdefault(str(data.entities[i]), []).append(j)
    chosen: list[int] = []
    while len(chosen) < min(n_queries, len(test_idx)):
        for entity in data.classes:
            queue = by_entity.get(entity, [])
            if queue and len(chosen) < n_queries:
                chosen.append(queue.pop(0))
        if not any(by_entity.values()):
            break
    sections = []
    for n, j in enumerate(chosen):
        i, rec = int(test_idx[j]), recommendations[j]
        truth = str(data.entities[i])
        neighbours = [data.images[position[nb.image_id]] for nb in rec.neighbours]
        captions = [f"QUERY\n{truth}\n-> {rec.entity}"] + [
            f"#{r + 1} d={nb.distance:.3g}\n{nb.entity}\n{nb.patient_id}" for r, nb in enumerate(rec.neighbours)]
        name = f"query-{n:02d}.png"
        _strip(data.images[i], neighbours, captions).save(out / name)
        verdict = "correct" if rec.entity == truth else "wrong"
        shares = ", ".join(f"{html.escape(e)} {s:.0%}" for e, s in rec.shares.items())
        items = "".join(
            f"<li>#{r + 1} {html.escape(nb.entity)}, distance {nb.distance:.4g}: patient "
            f"<code>{html.escape(str(nb.patient_id))}</code>, study <code>{html.escape(str(nb.study_id))}</code>, "
            f"image <code>{html.escape(nb.image_id)}</code></li>" for r, nb in enumerate(rec.neighbours))
        sections.append(
            f'<section><h2>query {n + 1}: {html.escape(truth)} → {html.escape(rec.entity)} '
            f'<span class="{verdict}">{verdict}</span></h2>'
            f'<p>image <code>{html.escape(data.image_ids[i])}</code>, patient '
            f'<code>{html.escape(data.patient_ids[i])}</code>; vote: {shares}</p>'
            f'<img src="{name}" alt="query {n + 1} and its neighbours"><ol>{items}</ol></section>')
    from msk.core.io.report import html_page

    page = html_page(f"{title}: {len(chosen)} test queries and their nearest training images", f"""
<p>Left: the query (framed) with its true entity and the vote; right: its nearest previous
patients' images, nearest first, with distance, confirmed entity and pseudonymised patient id.
No test patient is in the index.</p>
{chr(10).join(sections)}
""", what="recommender gallery", subtitle=str(out))
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
