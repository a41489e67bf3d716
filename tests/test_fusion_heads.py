"""Built-in fusion heads: shapes of the three variants, input checks, and that fusing both
branches learns what neither branch alone can."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msk.core.registry import build_fusion_head, get_registry
from msk.plugins.fusion_models import HEADS

NAMES = sorted(HEADS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_heads_are_registered():
    assert set(NAMES) <= set(get_registry().names("fusion_head"))
    assert NAMES == ["concat", "film", "gated"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("image_dim, meta_dim", [(12, 5), (12, 0), (0, 5)])
def test_one_code_path_for_fused_image_only_and_metadata_only(name, image_dim, meta_dim):
    head = build_fusion_head(name, image_dim=image_dim, meta_dim=meta_dim, num_classes=4,
                             hidden=(8, 6), dropout=0.1)
    img = torch.randn(7, image_dim) if image_dim else None
    meta = torch.randn(7, meta_dim) if meta_dim else None
    logits = head(img, meta)  # training mode: BatchNorm on a batch of 7
    assert logits.shape == (7, 4)
    logits.sum().backward()
    assert head.classifier.in_features == image_dim + (6 if meta_dim else 0)
    assert (head.meta_mlp is None) == (meta_dim == 0)
    if meta_dim:
        kinds = [type(m) for m in head.meta_mlp]
        assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * 2
    head.eval()
    with torch.no_grad():
        single = head(img[:1] if img is not None else None, meta[:1] if meta is not None else None)
    assert single.shape == (1, 4)  # evaluation accepts a batch of one


def test_heads_return_logits_not_probabilities():
    head = build_fusion_head("concat", image_dim=0, meta_dim=3, num_classes=3).eval()
    with torch.no_grad():
        out = head(None, torch.randn(32, 3) * 5)
    assert not torch.allclose(out.sum(dim=1), torch.ones(32))
    assert (out < 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_input_errors(name):
    with pytest.raises(ValueError, match="both 0"):
        build_fusion_head(name, image_dim=0, meta_dim=0, num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_fusion_head(name, image_dim=4, meta_dim=2, num_classes=1)
    with pytest.raises(ValueError, match="hidden must list"):
        build_fusion_head(name, image_dim=4, meta_dim=2, num_classes=3, hidden=())
    meta_only = build_fusion_head(name, image_dim=0, meta_dim=3, num_classes=2).eval()
    with pytest.raises(ValueError, match=r"image_dim=0 but was given image input of shape \(2,"):
        meta_only(torch.zeros(2, 4), torch.zeros(2, 3))
    image_only = build_fusion_head(name, image_dim=4, meta_dim=0, num_classes=2).eval()
    with pytest.raises(ValueError, match="meta_dim=0 but was given meta input"):
        image_only(torch.zeros(2, 4), torch.zeros(2, 3))
    fused = build_fusion_head(name, image_dim=4, meta_dim=3, num_classes=2).eval()
    with pytest.raises(ValueError, match=r"expects meta input \[B, 3\], got None"):
        fused(torch.zeros(2, 4), None)
    with pytest.raises(ValueError, match=r"expects image input \[B, 4\], got shape \(2, 5\)"):
        fused(torch.zeros(2, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        fused(torch.zeros(2, 4), torch.zeros(3, 3))


def test_unknown_head_name():
    from msk.plugins.fusion_models import build

    with pytest.raises(ValueError, match="fusion head 'mlp'; known: concat, gated, film"):
        build("mlp", image_dim=1, meta_dim=1, num_classes=2)


def test_film_starts_as_identity_and_gate_can_shut_the_image_out():
    torch.manual_seed(0)
    img, meta = torch.randn(16, 6), torch.randn(16, 3)
    film = build_fusion_head("film", image_dim=6, meta_dim=3, num_classes=2).eval()
    emb = film.meta_mlp(meta)
    assert torch.equal(film.combine(img, emb), img)
    gated = build_fusion_head("gated", image_dim=6, meta_dim=3, num_classes=2).eval()
    with torch.no_grad():
        gated.gate.bias.fill_(-1e4)  # sigmoid -> 0: the image features no longer matter
        a, b = gated(img, meta), gated(torch.randn(16, 6), meta)
    torch.testing.assert_close(a, b)


def _task(n: int, seed: int):
    """Label = sign(image signal + metadata signal): each branch alone is about 75 % right."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    img = torch.cat([a[:, None], torch.randn(n, 3, generator=g)], dim=1)
    meta = torch.cat([b[:, None], torch.randn(n, 2, generator=g)], dim=1)
    return img, meta, (a + b > 0).long()


def _fit_and_score(name: str, use_image: bool, use_meta: bool) -> float:
    torch.manual_seed(0)
    img, meta, y = _task(600, seed=1)
    t_img, t_meta, t_y = _task(400, seed=2)
    head = build_fusion_head(name, image_dim=4 if use_image else 0, meta_dim=3 if use_meta else 0,
                             num_classes=2, hidden=(16,), dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(150):
        loss = F.cross_entropy(head(img if use_image else None, meta if use_meta else None), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(t_img if use_image else None, t_meta if use_meta else None).argmax(1)
    return float((pred == t_y).float().mean())


@pytest.mark.parametrize("name", NAMES)
def test_fusion_uses_both_branches(name):
    fused = _fit_and_score(name, True, True)
    image_only = _fit_and_score(name, True, False)
    meta_only = _fit_and_score(name, False, True)
    assert fused > 0.9, fused
    assert image_only < 0.82 and meta_only < 0.82, (image_only, meta_only)
