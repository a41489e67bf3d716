"""Distribution: ingest and training spread over a two-node Ray cluster; the cluster launcher configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = "/mnt/msk"  # the shared-storage mount point both launcher configs promise (README)


# -- a local two-node cluster ---------------------------------------------------------------------


@pytest.mark.slow
def test_ingest_training_and_tuning_run_on_both_nodes_of_a_cluster(tmp_path):
    """tests/cluster_scenario.py in a subprocess: its own Ray cluster, not the session's Ray."""
    pytest.importorskip("ray.cluster_utils", reason="Ray's cluster_utils (local multi-node clusters) is unavailable")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_scenario.py"), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])

    nodes = set(summary["nodes"])
    assert len(nodes) == len(summary["nodes"]) == 2

    ingest = summary["ingest"]
    assert ingest["n_ok"] == ingest["n_inputs"] > 0
    per_node = ingest["files_per_node"]  # the manifest's `node` column, counted
    assert set(per_node) == nodes, f"decoding did not use both nodes: {per_node}"
    assert sum(per_node.values()) == ingest["n_inputs"]

    train = summary["train"]
    assert train["epochs"] == 1 and Path(train["best"]).is_file()
    ranks = train["ranks"]  # the run folder's workers/rank-<k>.json
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["node_id"] for r in ranks} == nodes, f"both Ray Train workers ran on one node: {ranks}"

    tune = summary["tune"]  # four trials, two at a time (one CPU each): both nodes run trials
    assert tune["status"] == ["ok"] * 4 and set(tune["trial_nodes"]) == nodes, tune
    assert Path(tune["best"]).is_file()

    with_train = summary["tune_train"]  # trials as Ray Train runs: driver on one node, worker on the other
    assert with_train["status"] == ["ok", "ok"], with_train
    for trial in with_train["trials"]:
        assert {trial["driver"], trial["worker"]} == nodes, with_train


# -- cluster launcher configs ---------------------------------------------------------------------


def _prepared(name: str) -> tuple[dict, dict]:
    """A launcher config as written, and as `ray up` sees it: defaults filled in, schema checked."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / name).read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    return config, prepared


def _mounts_shared(commands: list[str]) -> bool:
    return any(re.search(rf"\bmount\b.* {SHARED}\b", c) for c in commands)


def _installs_msk(commands: list[str], extra: str = "") -> bool:
    pattern = rf"pip install .*-e '?/opt/msk{re.escape(extra)}'?(\s|;|$)"
    return any(re.search(pattern, c) for c in commands)


def _starts_ray_from_the_venv(prepared: dict) -> None:
    head, worker = " ".join(prepared["head_start_ray_commands"]), " ".join(prepared["worker_start_ray_commands"])
    assert "msk-venv/bin/ray start --head" in head  # the Ray that msk was installed next to
    assert "msk-venv/bin/ray start --address=$RAY_HEAD_IP:6379" in worker


def test_cloud_config_has_a_cpu_head_gpu_workers_and_shared_storage():
    config, prepared = _prepared("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["file_mounts"]["/opt/msk"] == "."  # this checkout, installed on every node

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = {name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > 0}
    assert gpu_types, "no worker node type with GPUs"

    assert _mounts_shared(prepared["head_setup_commands"]) and _installs_msk(prepared["head_setup_commands"])
    for name, node_type in types.items():
        if name == prepared["head_node_type"]:
            continue
        setup = node_type.get("worker_setup_commands", prepared["worker_setup_commands"])
        assert _mounts_shared(setup), f"{name} does not mount {SHARED}"
        assert _installs_msk(setup), f"{name} does not install msk from the checkout"
        assert _installs_msk(setup, "[gpu]") == (name in gpu_types), f"{name}: the gpu extra belongs on GPU nodes only"
    _starts_ray_from_the_venv(prepared)


def test_on_prem_config_uses_the_local_provider_and_the_same_storage():
    config, prepared = _prepared("cluster.local.yaml")
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert "available_node_types" not in config  # the local provider has a single node type
    assert prepared["available_node_types"]["local.cluster.node"]["max_workers"] == len(provider["worker_ips"])
    assert config["file_mounts"]["/opt/msk"] == "."

    setup = prepared["worker_setup_commands"]
    assert setup == prepared["head_setup_commands"]  # every host is set up alike
    assert _mounts_shared(setup) and _installs_msk(setup)
    gpu_step = next(c for c in setup if _installs_msk([c], "[gpu]"))
    assert "nvidia-smi" in gpu_step  # the gpu extra only where a GPU is found
    _starts_ray_from_the_venv(prepared)
