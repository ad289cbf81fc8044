"""DAG files: they import cleanly, and the training DAG has the expected graph."""

import importlib.util
import itertools
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _load_dag_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", REPO / "dags" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dag_folder_imports_without_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert "sae_training" in bag.dag_ids


def test_empty_sae_config_means_unset(monkeypatch):
    """A compose file or a shell may leave SAE_CONFIG set but empty: every DAG still imports."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("SAE_CONFIG", "")
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert {"sae_training", "sae_batch_encoding", "sae_drift_monitor"} <= set(bag.dag_ids)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_training_dag_has_one_task_per_layer(tmp_path, layers):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"hidden_dims": [32, 16, 8][-layers:]}}))
    dag = _load_dag_module("sae_training").build_training_dag(str(cfg))
    pretrain = [f"pretrain_layer_{k}" for k in range(1, layers + 1)]
    order = ["ingest", "validate", "split", "fit_scaler", *pretrain, "finetune", "evaluate"]
    order += ["register", "promote"]
    assert set(dag.task_ids) == {"prepare", *order}
    for up, down in itertools.pairwise(order):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    for task_id in order:
        assert "prepare" in dag.get_task(task_id).upstream_task_ids
    heavy = {t.task_id for t in dag.tasks if t.queue == "default"}
    assert heavy == set(dag.task_ids)  # the default config keeps everything on one queue


def test_heavy_tasks_go_to_the_configured_queue(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"heavy_queue": "gpu", "model": {"hidden_dims": [8, 4]}}))
    dag = _load_dag_module("sae_training").build_training_dag(str(cfg))
    on_gpu = {t.task_id for t in dag.tasks if t.queue == "gpu"}
    assert on_gpu == {"pretrain_layer_1", "pretrain_layer_2", "finetune"}


def test_params_map_to_config_fields():
    from sae_pipeline.config import build_config

    module = _load_dag_module("sae_training")
    overrides = module.overrides_from_params({"pretrain_epochs": 3, "batch_size": 32, "seed": None})
    cfg = build_config({}, overrides)
    assert cfg.training.pretrain.epochs == 3
    assert cfg.training.pretrain.batch_size == cfg.training.finetune.batch_size == 32
    assert cfg.training.seed == 0
