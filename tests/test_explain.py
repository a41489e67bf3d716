"""GradientShap attributions of the metadata inputs, summed per clinical feature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from msk.core.data.metadata import MetadataEncoder, MetadataSchema
from msk.core.models.explain import (
    explain_metadata,
    group_attributions,
    importance_table,
    metadata_attributions,
    plot_importance,
)
from msk.core.registry import build_fusion_head

SITES = ["hand", "humerus", "tibia", "femur", "foot"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Only sex carries the label; age, site and view are noise."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["M", "F"], n)
    df = pd.DataFrame({
        "image_id": [f"s{seed}-{i}" for i in range(n)],
        "age": rng.uniform(2, 90, n),
        "sex": sex,
        "site": rng.choice(SITES, n),
        "view": rng.choice(["frontal", "lateral", "oblique"], n),
    })
    return df, (sex == "M").astype(np.int64)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    df, y = synthetic(400, seed=0)
    enc = MetadataEncoder(MetadataSchema(sites=SITES)).fit(df)
    x, t = torch.from_numpy(enc.transform(df)), torch.from_numpy(y)
    head = build_fusion_head("concat", image_dim=0, meta_dim=enc.dim, num_classes=2,
                             hidden=(16,), dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(100):
        loss = F.cross_entropy(head(None, x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval(), enc, df


def test_the_only_informative_feature_gets_the_largest_attribution(trained):
    head, enc, train = trained
    test, y = synthetic(120, seed=1)
    expl = explain_metadata(head, enc, test, y, ["female", "male"], background=train,
                            n_samples=20)
    assert list(expl.table.columns) == ["sex", "age", "site", "view"]
    assert list(expl.table.index) == ["female", "male", "all"]
    for entity, row in expl.table.iterrows():
        assert row.idxmax() == "sex", (entity, row.to_dict())
        assert row["sex"] > 3 * row.drop("sex").max(), (entity, row.to_dict())


def test_group_attributions_sum_the_columns_of_each_feature(trained):
    head, enc, train = trained
    test, y = synthetic(40, seed=2)
    expl = explain_metadata(head, enc, test, None, ["female", "male"], background=train,
                            n_samples=10)
    assert expl.columns.shape == (40, enc.dim)
    assert list(expl.columns.columns) == enc.feature_names
    site_cols = [f"site_{s}" for s in SITES]
    np.testing.assert_allclose(expl.groups["site"], expl.columns[site_cols].sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(expl.groups.sum(axis=1), expl.columns.sum(axis=1), rtol=1e-4,
                               atol=1e-6)
    assert set(expl.table.index) <= {"female", "male", "all"}  # target=None: predicted classes


def test_attributions_of_a_fused_head_hold_image_features_fixed():
    torch.manual_seed(0)
    head = build_fusion_head("gated", image_dim=4, meta_dim=3, num_classes=3).eval()
    meta, img = np.random.rand(6, 3).astype(np.float32), np.random.rand(6, 4).astype(np.float32)
    attr = metadata_attributions(head, meta, [0, 1, 2, 0, 1, 2], background=meta,
                                 image_features=img, n_samples=8)
    assert attr.shape == (6, 3) and attr.dtype == np.float32 and np.isfinite(attr).all()
    with pytest.raises(ValueError, match="one class per row"):
        metadata_attributions(head, meta, [0, 1], background=meta, image_features=img)
    with pytest.raises(ValueError, match="disagree"):
        metadata_attributions(head, meta, [0] * 6, background=meta[:, :2], image_features=img)


def test_group_attributions_need_groups_covering_every_column():
    with pytest.raises(ValueError, match="cover columns"):
        group_attributions(np.zeros((2, 3)), {"a": [0], "b": [1]})


def test_importance_table_and_plot(tmp_path):
    groups = pd.DataFrame({"sex": [1.0, -3.0, 0.5], "site": [0.1, 0.2, -0.3]})
    table = importance_table(groups, [0, 0, 1], ["a", "b", "c"])
    assert table.loc["a", "sex"] == 2.0 and table.loc["b", "site"] == pytest.approx(0.3)
    assert table.loc["all", "sex"] == pytest.approx(1.5) and "c" not in table.index
    png = plot_importance(table, tmp_path / "plots" / "importance.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
