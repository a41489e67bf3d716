"""DeepCluster on tiny synthetic shapes: the loop, resuming, empty clusters, collapse, Ray Train."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from msk.core.config import load_config
from msk.core.data.augment import SobelFilter, eval_transform, to_tensor, train_transform
from msk.core.errors import ConfigError
from msk.core.io.checkpoint import load_checkpoint, load_encoder
from msk.core.io.labels import load_assignments
from msk.core.models.deepcluster import (
    CollapseWarning,
    DeepClusterConfig,
    DeepClusterError,
    default_k,
    fix_empty_clusters,
    l2_normalize,
    latest_checkpoint,
    pca_whiten,
    read_history,
    run_deepcluster,
    uniform_cluster_indices,
)

SHAPES = ("disc", "square", "hbar", "vbar")


def shapes(n: int = 64, size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` noisy grey images of four shapes at random places and sizes, and their shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, truth = np.zeros((n, size, size), np.uint8), []
    for i in range(n):
        kind = SHAPES[i % 4]
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        r = rng.integers(size // 6, size // 4)
        mask = {
            "disc": (yy - cy) ** 2 + (xx - cx) ** 2 < r * r,
            "square": (abs(yy - cy) < r) & (abs(xx - cx) < r),
            "hbar": abs(yy - cy) < 2,
            "vbar": abs(xx - cx) < 2,
        }[kind]
        image = rng.normal(40, 12, (size, size))
        image[mask] = 200
        images[i] = np.clip(image, 0, 255)
        truth.append(kind)
    return images, truth


def tiny(**overrides) -> DeepClusterConfig:
    options = dict(encoder="tiny-cnn", k=8, epochs=2, pca_dim=16, batch_size=32, image_size=32,
                   num_workers=0, lr=0.02)
    return DeepClusterConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """One epoch, then the same folder resumed to two epochs."""
    out = tmp_path_factory.mktemp("deepcluster")
    images, truth = shapes()
    first = run_deepcluster(images, tiny(epochs=1, keep_checkpoints=None), out=out, ground_truth=truth,
                            progress=False)
    first_ckpt_mtime = (out / "checkpoints" / "epoch-001.pt").stat().st_mtime_ns
    second = run_deepcluster(images, tiny(epochs=2, keep_checkpoints=None), out=out, ground_truth=truth,
                             progress=True,
                             image_ids=[f"img{i}" for i in range(len(images))])
    return out, images, truth, first, second, first_ckpt_mtime


def test_history_has_nmi_per_epoch(resumed_run):
    out, images, truth, first, second, _ = resumed_run
    assert [row["epoch"] for row in second.history] == [1, 2]
    epoch1, epoch2 = second.history
    assert epoch1["nmi_prev"] is None and 0.0 <= epoch2["nmi_prev"] <= 1.0
    assert all(0.0 <= row["nmi_truth"] <= 1.0 for row in second.history)
    # purity against the truth: at least the largest class's share, at most 1
    largest = max(np.unique(truth, return_counts=True)[1]) / len(truth)
    assert all(largest - 1e-9 <= row["purity_truth"] <= 1.0 for row in second.history)
    assert all(row["loss"] > 0 and row["n_nonempty"] <= 8 for row in second.history)
    assert 1 / 8 <= epoch2["largest_cluster_share"] <= 1.0
    assert read_history(out) == second.history
    with (out / "history.csv").open() as f:
        assert next(csv.reader(f))[:5] == ["epoch", "nmi_prev", "nmi_truth", "purity_truth", "loss"]


def test_assignments_and_checkpoints_are_written(resumed_run):
    out, images, _, _, second, _ = resumed_run
    assert second.assignments.shape == (len(images),)
    assert second.assignments.min() >= 0 and second.assignments.max() < 8
    np.testing.assert_array_equal(load_assignments(out), second.assignments)
    assert second.checkpoint == latest_checkpoint(out) == out / "checkpoints" / "epoch-002.pt"
    assert (out / "checkpoints" / "epoch-001.pt").is_file()
    rows = list(csv.DictReader((out / "assignments.csv").open()))
    assert rows[3]["image_id"] == "img3" and int(rows[3]["cluster"]) == second.assignments[3]
    encoder, ckpt = load_encoder(second.checkpoint, arch="tiny-cnn")
    assert (ckpt.arch, ckpt.in_chans, ckpt.epoch) == ("tiny-cnn", 2, 2)  # Sobel: 2 channels
    assert ckpt.config["k"] == 8 and ckpt.config["sobel"] is True
    np.testing.assert_array_equal(ckpt.extra["assignments"].numpy(), second.assignments)
    assert encoder(torch.zeros(1, 2, 32, 32)).shape == (1, 64)
    assert load_config(DeepClusterConfig, out / "config.yaml").epochs == 2


def test_resume_continues_after_the_last_epoch(resumed_run):
    out, images, truth, first, second, first_ckpt_mtime = resumed_run
    assert [row["epoch"] for row in first.history] == [1]
    assert second.history[0] == first.history[0]  # epoch 1 was not run again
    assert (out / "checkpoints" / "epoch-001.pt").stat().st_mtime_ns == first_ckpt_mtime
    before = load_checkpoint(second.checkpoint).state_dict
    again = run_deepcluster(images, tiny(epochs=2), out=out, progress=False)  # nothing left to do
    assert again.history == second.history
    after = load_checkpoint(again.checkpoint).state_dict
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_resume_with_other_options_is_an_error(resumed_run):
    out, images, *_ = resumed_run
    with pytest.raises(ConfigError, match=r"k: 8 -> 6.*new --out"):
        run_deepcluster(images, tiny(k=6), out=out, progress=False)
    with pytest.raises(ConfigError, match="trained on 64 images, this run has 60"):
        run_deepcluster(images[:60], tiny(), out=out, progress=False)


def test_k_defaults_from_the_number_of_images(tmp_path, capsys):
    assert [default_k(n) for n in (50, 800, 3000, 100_000)] == [10, 40, 150, 1000]
    images, _ = shapes(240)
    result = run_deepcluster(images, tiny(k=None, epochs=2), out=tmp_path, progress=False)
    assert result.k == 12 and int(result.assignments.max()) < 12
    # only the last epoch's checkpoint is kept by default (keep_checkpoints=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-002.pt"]
    assert "k = 12 (about one cluster per 20 of the 240 images" in capsys.readouterr().err
    # recorded as the number, so that readers of the run folder and a resumption see it
    assert load_config(DeepClusterConfig, tmp_path / "config.yaml").k == 12
    assert load_checkpoint(result.checkpoint).config["k"] == 12


def test_unset_k_resumes_with_the_runs_k(resumed_run):
    out, images, *_ = resumed_run  # trained with k=8; default_k(64) would be 10
    result = run_deepcluster(images, tiny(k=None), out=out, progress=False)
    assert result.k == 8
    assert load_config(DeepClusterConfig, out / "config.yaml").k == 8


def test_fewer_images_than_clusters_is_an_error(tmp_path):
    images = np.zeros((300, 16, 16), np.uint8)
    with pytest.raises(DeepClusterError, match="k=1000 clusters need at least 1000 images; "
                                               "got 300 — lower --k"):
        run_deepcluster(images, tiny(k=1000), out=tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_from_ingest_reads_images_and_rows(monkeypatch):
    import pyarrow as pa

    from msk.core.io import dataset
    from msk.core.models import deepcluster

    images, _ = shapes(3, size=16)
    table = pa.table({"image_id": ["a", "b", "c"], "patient_id": ["p", "p", "q"],
                      "image": [im.tobytes() for im in images], "height": [16] * 3,
                      "width": [16] * 3})
    monkeypatch.setattr(dataset, "read_shards", lambda out, columns=None: table)
    stack, rows = deepcluster.from_ingest("an-ingest")
    np.testing.assert_array_equal(stack, images)
    assert rows.column("image_id").to_pylist() == ["a", "b", "c"]


def test_images_must_be_a_uint8_stack(tmp_path):
    with pytest.raises(DeepClusterError, match=r"uint8 array \[N, S, S\]"):
        run_deepcluster(np.zeros((20, 16, 16), np.float32), tiny(k=2), out=tmp_path)


def test_collapse_is_warned_on_constant_images(tmp_path):
    images = np.full((24, 32, 32), 128, np.uint8)
    with pytest.warns(CollapseWarning, match="one cluster holds 100% of the images"):
        result = run_deepcluster(images, tiny(k=4, epochs=1, augment=False), out=tmp_path,
                                 progress=False)
    assert result.history[0]["largest_cluster_share"] == 1.0
    assert result.history[0]["n_nonempty"] == 1


def test_split_refills_an_empty_cluster():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-5, 0.1, (10, 2)), rng.normal(5, 0.1, (10, 2)),
                        rng.normal([0, 20], 0.1, (5, 2))]).astype(np.float32)
    labels = np.array([0] * 20 + [2] * 5)  # cluster 1 is empty, cluster 0 holds two groups
    centroids = np.array([x[:20].mean(0), [100.0, 100.0], x[20:].mean(0)], np.float32)
    new, new_centroids, fixed = fix_empty_clusters(x, labels, centroids, strategy="split",
                                                   rng=np.random.default_rng(1))
    assert fixed == 1
    assert np.bincount(new, minlength=3).min() > 0
    np.testing.assert_array_equal(new[20:], 2)  # only the donor's points moved
    assert set(new[:20]) == {0, 1}
    for c in (0, 1):
        np.testing.assert_allclose(new_centroids[c], x[new == c].mean(0), rtol=1e-5)


def test_resample_refills_an_empty_cluster_from_a_donor_point():
    x = np.array([[0.0, 0.0], [0.0, 0.1], [9.0, 9.0], [9.0, 9.1]], np.float32)
    labels = np.array([0, 0, 0, 0])
    centroids = np.array([x.mean(0), [50.0, 50.0]], np.float32)
    new, _, fixed = fix_empty_clusters(x, labels, centroids, strategy="resample",
                                       rng=np.random.default_rng(0))
    assert fixed == 1 and sorted(np.bincount(new)) == [2, 2]
    assert new[0] == new[1] and new[2] == new[3]


def test_identical_points_cannot_be_split():
    x = np.ones((6, 3), np.float32)
    labels = np.zeros(6, np.int64)
    centroids = np.array([[1, 1, 1], [0, 0, 0]], np.float32)
    new, _, fixed = fix_empty_clusters(x, labels, centroids, rng=np.random.default_rng(0))
    assert fixed == 0
    np.testing.assert_array_equal(new, labels)


def test_uniform_sampling_over_clusters():
    labels = np.array([0] * 90 + [1] * 9 + [2])
    drawn = uniform_cluster_indices(labels, 30_000, np.random.default_rng(0))
    shares = np.bincount(labels[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.02)


def test_pca_whiten_clips_dimension_and_whitens():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)) * np.arange(1, 9)
    y = pca_whiten(x, 256)
    assert y.shape == (50, 8)
    np.testing.assert_allclose(y.var(axis=0, ddof=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(y), axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(pca_whiten(np.ones((5, 4)), 3)).all()  # zero variance stays finite


def test_sobel_filter_is_fixed_and_finds_edges():
    sobel = SobelFilter()
    assert not list(sobel.parameters())
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0  # a vertical edge
    gx, gy = sobel(step)[0]
    assert gx.abs().sum() > 0 and gy[1:-1].abs().sum() == 0


def test_transforms_give_the_image_size():
    image = to_tensor(np.arange(48 * 48, dtype=np.uint8).reshape(48, 48))
    assert eval_transform(32)(image).shape == (1, 32, 32)
    torch.manual_seed(0)
    assert train_transform(32)(image).shape == (1, 32, 32)
    assert torch.equal(eval_transform(32)(image), eval_transform(32)(image))


@pytest.mark.slow
def test_ray_train_run(ray_session, tmp_path):
    """The same loop as one Ray Train run with two DDP workers (gloo)."""
    images, truth = shapes(48, seed=1)
    result = run_deepcluster(images, tiny(epochs=2, k=6, num_workers=2), out=tmp_path,
                             ground_truth=truth, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[1]["nmi_prev"] is not None
    assert result.assignments.shape == (48,)
    assert load_checkpoint(result.checkpoint).epoch == 2
    assert not list((tmp_path / "ray").rglob("*.pt")), "checkpoints copied again under ray/"
