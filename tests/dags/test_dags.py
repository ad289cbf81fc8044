"""DAG files: they import cleanly, and the training DAG has the expected graph."""

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
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


def test_batch_encoding_runs_on_cpu_workers_whatever_the_heavy_queue(monkeypatch):
    monkeypatch.setenv("SAE_HEAVY_QUEUE", "gpu")
    dag = _load_dag_module("sae_batch_encoding").encoding_dag
    assert {t.queue for t in dag.tasks} == {"default"}


def test_params_map_to_config_fields():
    from sae_pipeline.config import build_config

    module = _load_dag_module("sae_training")
    overrides = module.overrides_from_params({"pretrain_epochs": 3, "batch_size": 32, "seed": None})
    cfg = build_config({}, overrides)
    assert cfg.training.pretrain.epochs == 3
    assert cfg.training.pretrain.batch_size == cfg.training.finetune.batch_size == 32
    assert cfg.training.seed == 0


# ---- timeouts, failure callbacks, errors that retries cannot fix -----------------------------
def test_every_task_has_an_execution_timeout_and_heavy_ones_a_longer_one():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    from airflow.providers.standard.operators.hitl import HITLOperator

    for dag in bag.dags.values():
        for t in dag.tasks:
            if isinstance(t, HITLOperator):  # waits for a person: bounded by its response timeout
                assert t.response_timeout is not None, (dag.dag_id, t.task_id)
                continue
            assert t.execution_timeout is not None, (dag.dag_id, t.task_id)
    training = bag.dags["sae_training"]
    assert training.get_task("finetune").execution_timeout > (
        training.get_task("evaluate").execution_timeout
    )


def test_task_timeouts_are_configurable(tmp_path, monkeypatch):
    import datetime

    monkeypatch.setenv("SAE_TASK_TIMEOUT_MINUTES", "5")
    monkeypatch.setenv("SAE_HEAVY_TASK_TIMEOUT_MINUTES", "90")
    dag = _load_dag_module("sae_training").build_training_dag(None)
    assert dag.get_task("register").execution_timeout == datetime.timedelta(minutes=5)
    assert dag.get_task("finetune").execution_timeout == datetime.timedelta(minutes=90)


def test_prepare_fails_at_once_on_a_config_error(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    dag = _load_dag_module("sae_training").build_training_dag(None)
    prepare = dag.get_task("prepare").python_callable
    with pytest.raises(AirflowFailException, match="not found"):
        prepare(params={"config_path": str(tmp_path / "missing.yaml")}, run_id="manual__x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("task_id", ["pretrain_layer_1", "finetune"])
def test_a_heavy_task_without_the_cuda_it_requires_fails_at_once(tmp_path, monkeypatch, task_id):
    """AirflowFailException: no retries on a worker that cannot give CUDA, the cause named."""
    import json

    from airflow.sdk.exceptions import AirflowFailException

    config_uri = tmp_path / "run" / "config.json"
    config_uri.parent.mkdir()
    config_uri.write_text(json.dumps({"training": {"device": "cuda"}}))
    ctx = {"config_uri": str(config_uri), "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    dag = _load_dag_module("sae_training").build_training_dag(None)
    callable_ = dag.get_task(task_id).python_callable
    args = {"ctx": ctx, "layer": 1} if task_id != "finetune" else {"ctx": ctx}
    with pytest.raises(AirflowFailException, match=r"cannot use CUDA: .*CUDA_VISIBLE_DEVICES"):
        callable_(**args)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


def test_a_task_that_fails_for_good_marks_the_mlflow_run_failed(store):
    from mlflow import MlflowClient

    from sae_pipeline.steps import training as steps

    module = _load_dag_module("sae_training")
    dag = module.build_training_dag(None)
    assert all(t.on_failure_callback for t in dag.tasks)
    ctx = steps.prepare("manual__fails", None, store)

    class TaskInstance:
        task_id = "finetune"

        def xcom_pull(self, task_ids):
            return ctx if task_ids == "prepare" else None

    module.mark_mlflow_run_failed({"ti": TaskInstance(), "exception": RuntimeError("CUDA OOM")})
    run = MlflowClient(store["registry.tracking_uri"]).get_run(ctx["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "finetune failed: CUDA OOM" in run.data.tags["sae.failure"]


def test_candidate_child_runs_are_ended(store):
    from mlflow import MlflowClient

    from sae_pipeline.registry import tracking
    from sae_pipeline.steps import training as steps

    ctx = steps.prepare("manual__candidates", None, store)
    cfg = steps.config_of(ctx)
    child = tracking.child_run(cfg, ctx["mlflow_run_id"], "candidate a", {"x": 1}, {"val_mse": 0.5})
    run = MlflowClient(store["registry.tracking_uri"]).get_run(child)
    assert run.info.status == "FINISHED" and run.data.metrics["val_mse"] == 0.5
    # Found again (not created twice) on a retry.
    assert tracking.child_run(cfg, ctx["mlflow_run_id"], "candidate a", {"x": 1}) == child


def test_drift_monitor_reads_only_the_newest_asset_event(monkeypatch):
    """inlet_events[asset] fetches every event ever emitted unless bounded: the task must ask
    for the newest one only, and hand exactly that one on."""
    from types import SimpleNamespace

    from sae_pipeline.steps import monitoring

    module = _load_dag_module("sae_drift_monitor")
    emitted = [SimpleNamespace(extra={"path": f"/data/batch-{i}.parquet"}) for i in range(5)]

    class Events:  # the shape of Airflow's InletEventsAccessor, over `emitted` (oldest first)
        def __init__(self):
            self.query = {"ascending": True, "limit": None}
            self.fetched = 0

        def ascending(self, ascending=True):
            self.query["ascending"] = ascending
            return self

        def limit(self, limit):
            self.query["limit"] = limit
            return self

        def _rows(self):
            rows = emitted if self.query["ascending"] else emitted[::-1]
            rows = rows[: self.query["limit"]] if self.query["limit"] else rows
            self.fetched = max(self.fetched, len(rows))
            return rows

        def __getitem__(self, i):
            return self._rows()[i]

        def __len__(self):
            return len(self._rows())

        def __iter__(self):
            return iter(self._rows())

    seen, handed = {}, object()

    def context(run_id, params, events, latest):
        seen["latest"] = [e.extra["path"] for e in latest]
        return handed

    monkeypatch.setattr(monitoring, "context", context)
    prepare = module.drift_dag.get_task("prepare").python_callable
    events = Events()
    result = prepare(
        params={}, run_id="scheduled__x", triggering_asset_events={},
        inlet_events={module.NEW_BATCHES: events},
    )  # fmt: skip
    assert result is handed  # the task returns what the step returned
    assert seen["latest"] == ["/data/batch-4.parquet"]  # the newest, and only it
    assert events.fetched == 1  # one event read from the metadata database, not all five


@pytest.mark.parametrize(
    ("dag_file", "attr"), [("sae_training", None), ("sae_drift_monitor", "drift_dag")]
)
def test_a_run_with_a_foreign_tracking_uri_is_refused_before_any_mlflow_call(
    monkeypatch, dag_file, attr
):
    """The workers hold MLflow credentials; MLflow sends them to whatever server a run names."""
    import mlflow
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "sae-worker")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "worker-secret")
    calls = []

    def no_mlflow(*args, **kwargs):
        calls.append(args)
        raise AssertionError("an MLflow call before the check")

    monkeypatch.setattr(mlflow.MlflowClient, "__init__", no_mlflow)
    monkeypatch.setattr(mlflow, "set_tracking_uri", no_mlflow)
    module = _load_dag_module(dag_file)
    dag = getattr(module, attr) if attr else module.build_training_dag(None)
    prepare = dag.get_task("prepare").python_callable
    kwargs = {}
    if attr:  # the asset's events are not read: the batch param names the batch
        kwargs = {"triggering_asset_events": {}, "inlet_events": {module.NEW_BATCHES: None}}
    params = {"tracking_uri": "http://collector.example:5000", "batch": "/data/b.parquet"}
    with pytest.raises(AirflowFailException, match="not this deployment's MLflow server"):
        prepare(params=params, run_id="manual__evil", **kwargs)
    assert calls == []
