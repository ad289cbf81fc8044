"""The distributed deployment on this machine, without Docker: what docker/compose.yaml runs.

An MLflow server on PostgreSQL (started by mlflow/start-server.sh, basic auth on), Airflow with
the CeleryExecutor on PostgreSQL and Redis (api-server, scheduler, dag-processor, a worker on
the ``default`` queue and one on ``gpu``). The training DAG is triggered through Airflow's REST
API; the heavy tasks must run on the ``gpu`` worker and the model must land in the MLflow
registry. Then the ``gpu`` worker is killed in the middle of a pretraining task: the task is
retried on the restarted worker, resumes from its epoch checkpoint, and the run registers
exactly one new version. Needs PostgreSQL (127.0.0.1:5432, user postgres, trust) and Redis
(127.0.0.1:6379); deselect with ``-m "not distributed"`` where they do not run.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

import pytest
import yaml

from sae_pipeline import storage
from sae_pipeline.config import load_config
from tests.distributed_topology import (
    REPO,
    WORKER_NAMES,
    HttpError,
    Topology,
    require_services,
    wait_for,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.distributed,
    pytest.mark.integration,
    pytest.mark.slow,
]

HEAVY_TASKS = {"pretrain_layer_1", "pretrain_layer_2", "finetune"}


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """One started topology shared by the tests of this module; everything removed after."""
    require_services()
    tmp = tmp_path_factory.mktemp("distributed")
    # The deployment's config, with test-sized settings: a small network, every requested
    # epoch run (no early stopping), so that the fault test's pretraining lasts long enough.
    cfg = yaml.safe_load((REPO / "configs" / "distributed.yaml").read_text())
    cfg["artifacts_root"] = str(tmp / "artifacts")
    cfg["training"]["device"] = "cpu"  # the test's gpu worker is a CPU process
    cfg["model"] = {"hidden_dims": [32, 8]}
    cfg["training"]["pretrain"] = {"epochs": 2, "learning_rate": 0.003, "patience": 0}
    cfg["evaluation"] = {"probe_max_iter": 500}
    config_path = tmp / "distributed-test.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    assert load_config(config_path).heavy_queue == "gpu"

    topo = Topology(tmp, config_path)
    try:
        topo.start()
    except BaseException:
        diagnostics = topo.diagnostics()
        topo.stop()
        raise RuntimeError(f"the distributed topology did not start\n{diagnostics}") from None
    print(f"\ndistributed topology: {', '.join(f'{k} {v:.1f} s' for k, v in topo.timings.items())}")
    yield topo
    topo.stop()


@pytest.fixture(scope="module")
def cfg(topology):
    return load_config(topology.config_path)


def _tags(version: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in version.get("tags", [])}


def _versions_of_run(topology: Topology, name: str, run_id: str) -> list[dict]:
    return [v for v in topology.model_versions(name) if _tags(v).get("sae.dag_run_id") == run_id]


def test_training_dag_runs_heavy_tasks_on_the_gpu_worker_and_registers_the_model(
    topology, cfg, monkeypatch
):
    encoder, scaler = cfg.registry.encoder_model_name, cfg.registry.scaler_model_name
    before = len(topology.model_versions(encoder))
    run_id = f"distributed__{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    topology.trigger(run_id, {"pretrain_epochs": 2, "finetune_epochs": 3})
    run = topology.wait_for_run(run_id, timeout=300)
    print(f"\ntrigger to {run['state']}: {time.perf_counter() - t0:.1f} s")
    assert run["state"] == "success", topology.diagnostics()

    # Which worker ran what, from Airflow's task-instance records.
    tis = topology.task_instances(run_id)
    assert set(tis) > HEAVY_TASKS
    for task_id, ti in tis.items():
        queue = "gpu" if task_id in HEAVY_TASKS else "default"
        assert (ti["state"], ti["queue"], ti["hostname"], ti["try_number"]) == (
            "success",
            queue,
            WORKER_NAMES[queue],
            1,
        ), task_id

    # The registry, from the MLflow server: one version of each model, aliased.
    with pytest.raises(HttpError) as denied:
        topology.mlflow("/registered-models/search", auth=False)
    assert denied.value.status == 401
    mine = {name: _versions_of_run(topology, name, run_id) for name in (encoder, scaler)}
    assert [len(v) for v in mine.values()] == [1, 1]
    version = mine[encoder][0]["version"]
    got = topology.mlflow("/model-versions/get", name=encoder, version=version)["model_version"]
    expected_aliases = {"challenger", "champion"} if before == 0 else {"challenger"}
    assert expected_aliases <= set(got.get("aliases", []))
    tags = _tags(got)
    for key in ("sae.data_hash", "sae.code_version", "sae.config_hash"):
        assert tags[key], key

    # Artifacts: the run's outputs in the shared store, the model files in MLflow's store.
    run_dir = Path(cfg.artifacts_root) / "runs" / storage.run_key(run_id)
    assert (run_dir / "finetune" / "model.pt").is_file()
    assert any(topology.mlflow_artifacts.rglob("MLmodel"))

    # A consumer loads the champion through the server, as the README shows.
    import mlflow.pyfunc

    from sae_pipeline.data.sources import load_sklearn

    monkeypatch.setenv("MLFLOW_TRACKING_URI", topology.mlflow_url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", topology.mlflow_user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", topology.mlflow_password)
    model = mlflow.pyfunc.load_model(f"models:/{encoder}@challenger")
    codes = model.predict(load_sklearn("digits").drop(columns="target").head(50))
    assert codes.shape == (50, cfg.code_dim)


def test_killed_gpu_worker_task_retries_resumes_from_checkpoint_and_registers_once(topology, cfg):
    import torch

    encoder, scaler = cfg.registry.encoder_model_name, cfg.registry.scaler_model_name
    before = {name: len(topology.model_versions(name)) for name in (encoder, scaler)}
    epochs = 40
    run_id = f"fault__{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    # Small batches make each epoch long enough to kill the worker between two checkpoints.
    topology.trigger(run_id, {"pretrain_epochs": epochs, "finetune_epochs": 2, "batch_size": 16})
    pretrain_dir = Path(cfg.artifacts_root) / "runs" / storage.run_key(run_id) / "pretrain"
    checkpoint, finished = pretrain_dir / "layer_1.ckpt", pretrain_dir / "layer_1.pt"

    def checkpointed():
        topology.check_alive()
        return checkpoint.exists()

    wait_for("pretrain_layer_1's first epoch checkpoint", checkpointed, timeout=240, interval=0.1)
    topology.kill_worker("gpu")
    killed = time.perf_counter()
    assert not finished.exists(), f"pretrain_layer_1 ended before the kill; raise {epochs=}"
    at_kill = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 0 < at_kill < epochs
    assert topology.task_instances(run_id)["pretrain_layer_1"]["try_number"] == 1

    topology.start_worker("gpu")  # a worker comes back
    run = topology.wait_for_run(run_id, timeout=420)
    print(
        f"\nfault run: kill after {killed - t0:.1f} s (checkpoint epoch {at_kill}), "
        f"{run['state']} after {time.perf_counter() - t0:.1f} s"
    )
    assert run["state"] == "success", topology.diagnostics()

    ti = topology.task_instances(run_id)["pretrain_layer_1"]
    assert (ti["state"], ti["try_number"], ti["hostname"]) == ("success", 2, WORKER_NAMES["gpu"])
    log = topology.task_log(run_id, "pretrain_layer_1", 2)
    resumed = re.search(r"resumed from \S*layer_1\.ckpt at epoch (\d+)", log)
    assert resumed, log[-3000:]
    assert int(resumed[1]) >= at_kill
    assert not checkpoint.exists()  # removed once the layer is done

    # Exactly one new version of each model, from this run, whose MLflow run holds every
    # epoch of layer 1 once: the resumed try continued the history instead of restarting it.
    mine = {name: _versions_of_run(topology, name, run_id) for name in (encoder, scaler)}
    assert [len(v) for v in mine.values()] == [1, 1]
    for name in (encoder, scaler):
        assert len(topology.model_versions(name)) == before[name] + 1
    history = topology.mlflow(
        "/metrics/get-history",
        run_id=mine[encoder][0]["run_id"],
        metric_key="pretrain_layer1_train_loss",
        max_results=1000,
    )["metrics"]
    assert sorted(m["step"] for m in history) == list(range(epochs))
