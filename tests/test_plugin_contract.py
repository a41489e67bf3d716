"""Every registered plugin, built-in or third-party, honours its hook's contract.

Parametrised over the live registry, so a newly installed plugin is checked by the same tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from msk.core.registry import get_registry
from msk.core.specs import Malignancy


def _entries(kind):
    return [pytest.param(e, id=e.name) for e in get_registry().entries(kind)]


@pytest.mark.parametrize("entry", _entries("entity_set"))
def test_entity_set_contract(entry):
    es = entry.spec
    assert len(es) >= 2 and es.kind in ("region", "tumour")
    assert len(set(es.names)) == len(es) and len({e.code for e in es.entities}) == len(es)
    for i, e in enumerate(es.entities):
        assert es.index(e.name) == i and es.index(e.code) == i
        assert 0 <= e.female_fraction <= 1
        if es.kind == "tumour":
            assert isinstance(e.malignancy, Malignancy), f"{e.name} lacks a malignancy grade"
        for site in e.sites:  # sites name regions of the SAM-X set
            get_registry().get("entity_set", "samx-regions").index(site)


@pytest.mark.parametrize("entry", _entries("lesion_drawer"))
def test_lesion_drawer_contract(entry):
    """A drawing marks a lesion of a few dozen pixels or more around its frame, the same one for
    the same generator; its outline labels and its entity are known to msk."""
    from msk.core.synth.canvas import Canvas, Capsule, Transform
    from msk.core.synth.lesions import Frame

    drawer = entry.spec
    assert drawer.description, f"{entry.name}: give the drawer a description"
    assert any(entry.name in es.spec.names for es in get_registry().entries("entity_set")), \
        f"{entry.name}: no registered entity set has this entity"
    masks = []
    for seed in (0, 0, 1):
        cv = Canvas(160, 160, Transform(160.0, centre=(80.0, 80.0)), np.full((160, 160), 0.5, np.float32))
        cv.bone_part(Capsule((0.5, 0.1), (0.5, 0.9), 0.06), 0.012)  # a long bone along the frame
        frame = Frame(c=(0.5, 0.5), along=(0.0, 1.0), across=(1.0, 0.0), r=0.06, depth=1.5)
        drawer.draw(cv, frame, np.random.default_rng(seed))
        assert np.isfinite(cv.bone).all() and np.isfinite(cv.soft).all()
        masks.append(cv.mask.copy())
    assert masks[0].sum() >= 24, f"{entry.name}: the drawing marks too little as lesion (lesion=True, cv.mark)"
    assert np.array_equal(masks[0], masks[1]), f"{entry.name}: draw with the rng it is given only"
    rows, cols = np.nonzero(masks[0])
    assert np.abs(rows - 80).max() <= 60 and np.abs(cols - 80).max() <= 60, \
        f"{entry.name}: the lesion strays more than 6 bone half widths from its frame"
    assert all(isinstance(label, str) and label == label.strip().lower() for label in drawer.outlines)


@pytest.mark.parametrize("entry", _entries("tuning_task"))
def test_tuning_task_contract(entry):
    """A task builds, its default config is valid, and names the command its best config is for."""
    from msk.core.config import MskConfig
    from msk.core.stages.tuning.search import Task

    spec = entry.spec
    task = get_registry().build("tuning_task", entry.name, **spec.example_options)
    assert isinstance(task, Task), f"{entry.name}: build must return a msk.core.stages.tuning.search.Task"
    assert issubclass(task.config_cls, MskConfig) and task.mode in ("min", "max") and task.metric
    assert task.epochs(task.config_cls()) >= 1, f"{entry.name}: epochs_key must name the config's epochs"
    assert spec.command.startswith("msk ") and spec.labels, f"{entry.name}: say its command and LABELS"
    assert spec.space is None or spec.space.is_file()


def test_every_kind_has_a_contract_test():
    from msk.core.hookspecs import COMPONENT_KINDS

    missing = [k.name for k in COMPONENT_KINDS if f"test_{k.name}_contract" not in globals()]
    assert not missing, f"component kinds without a contract test here: {missing}"


@pytest.mark.parametrize("entry", _entries("dataset"))
def test_dataset_contract(entry, tmp_path):
    from msk.core.errors import ConfigError
    from msk.core.specs import DatasetOptions
    from msk.core.stages.ingest.importing import read_records

    spec = entry.spec
    assert issubclass(spec.options, DatasetOptions), f"{entry.name}: options must subclass DatasetOptions"
    assert spec.example_layout is not None, f"{entry.name}: give the spec an example_layout"
    options = spec.example_layout(tmp_path)
    records = read_records(spec, tmp_path, options)  # labels checked against the entity set
    assert len(records) >= 2 and len({r.label for r in records}) >= 2
    for r in records:
        assert (tmp_path / r.path).is_file(), f"{entry.name}: {r.path} is not a file of the layout"
        assert r.where, f"{entry.name}: records must say where they come from (file, line)"
    assert read_records(spec, tmp_path, options) == records  # a stable order
    with pytest.raises(ConfigError, match="not_an_option"):
        spec.parse_options({**options, "not_an_option": 1})


@pytest.mark.parametrize("entry", _entries("encoder"))
def test_encoder_contract(entry):
    import torch

    name = entry.spec.example_name
    for in_chans in (1, 3):
        enc = get_registry().build("encoder", name, in_chans=in_chans, **entry.spec.example_options).eval()
        assert isinstance(enc.feature_dim, int) and enc.feature_dim > 0
        with torch.no_grad():
            out = enc(torch.rand(2, in_chans, 64, 64))
        assert out.shape == (2, enc.feature_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("entry", _entries("segmenter"))
def test_segmenter_contract(entry):
    import torch

    from msk.core.errors import MskError

    options = dict(entry.spec.example_options)
    net = get_registry().build("segmenter", entry.spec.example_name, in_chans=1, **options).eval()
    assert isinstance(net.architecture, str) and isinstance(net.encoder_name, str)
    with torch.no_grad():
        out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    with pytest.raises(MskError, match="no-such-encoder"):  # a one-line error, not a KeyError
        get_registry().build("segmenter", entry.spec.example_name, **{**options, "encoder": "no-such-encoder"})


@pytest.mark.parametrize("entry", _entries("clusterer"))
def test_clusterer_contract(entry):
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    truth = np.repeat(np.arange(3), 40)
    x = (centres[truth] + rng.normal(size=(120, 8))).astype(np.float32)
    clusterer = get_registry().build("clusterer", entry.spec.example_name, **entry.spec.example_options)
    res = clusterer.fit(x, k=3, seed=0)
    assert res.labels.shape == (120,) and res.centroids.shape == (3, 8)
    assert normalized_mutual_info_score(truth, res.labels) > 0.99
    with pytest.raises(ValueError, match="k=200 clusters need at least 200 points"):
        clusterer.fit(x, k=200, seed=0)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clusterer.fit(x, k=3, seed=0)


@pytest.mark.parametrize("entry", _entries("retriever"))
def test_retriever_contract(entry, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"img-{i}" for i in range(300)]
    index = get_registry().build("retriever", entry.spec.example_name, dim=32,
                                 **entry.spec.example_options)
    index.train(x)
    index.add(x, ids)
    assert index.ntotal == 300
    res = index.search(x[:20], k=5)
    assert len(res.ids) == 20 and all(len(r) == 5 for r in res.ids)
    hits = np.mean([row[0] == f"img-{i}" for i, row in enumerate(res.ids)])
    assert hits >= 0.9, f"{entry.name}: a stored vector should be its own nearest neighbour"
    loaded = type(index).load(index.save(tmp_path / "index"))
    assert loaded.search(x[:20], k=5).ids == res.ids


@pytest.mark.parametrize("entry", _entries("fusion_head"))
def test_fusion_head_contract(entry):
    import torch

    build = get_registry().build
    for image_dim, meta_dim in ((16, 6), (16, 0), (0, 6)):
        head = build("fusion_head", entry.spec.example_name, image_dim=image_dim,
                     meta_dim=meta_dim, num_classes=3, **entry.spec.example_options).eval()
        img = torch.rand(4, image_dim) if image_dim else None
        meta = torch.rand(4, meta_dim) if meta_dim else None
        with torch.no_grad():
            logits = head(img, meta)
        assert logits.shape == (4, 3) and torch.isfinite(logits).all()
