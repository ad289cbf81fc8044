"""The drift loop under a real scheduler, with a person's review (issue 13).

The distributed topology of ``tests/distributed_topology.py`` (CeleryExecutor on PostgreSQL and
Redis, a ``default`` and a ``gpu`` worker, the MLflow server), with the scheduler creating runs
from Asset events; nothing runs under ``dag.test()``. An upstream producer announces batches
on ``sae_new_batches`` through the REST API; the scheduler starts encoding and the drift
monitor; under ``review: required`` the monitor waits at its ``review`` task until the test,
as the user ``reviewer``, answers through the REST API; a ``retrain`` answer makes the scheduler
start ``sae_training`` (heavy tasks on the ``gpu`` worker), whose gate moves ``@champion``.

One topology and one in-process champion for the module, test-sized training, and batches
announced back to back, so that the module stays a few minutes long.
"""

from __future__ import annotations

import time
import urllib.parse

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.distributed_topology import REPO, WORKER_NAMES, Topology, require_services, wait_for

pytestmark = [
    pytest.mark.system,
    pytest.mark.distributed,
    pytest.mark.integration,
    pytest.mark.slow,
]

MONITOR, ENCODING, TRAINING = "sae_drift_monitor", "sae_batch_encoding", "sae_training"
HEAVY_TASKS = {"pretrain_layer_1", "pretrain_layer_2", "finetune"}
FEATURES = [f"f{i}" for i in range(6)]


def blobs(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> pd.DataFrame:
    """Three labelled Gaussian classes (fixed centres); scaled and shifted for drift."""
    centres = np.random.default_rng(42).normal(0.0, 3.0, size=(3, len(FEATURES)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (centres[y] + rng.normal(size=(n, len(FEATURES)))) * scale + shift
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["target"] = y
    return frame


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """The started topology, a champion trained in this process, and the batch files."""
    require_services()
    tmp = tmp_path_factory.mktemp("distributed-loop")
    data = tmp / "data"
    data.mkdir()
    blobs(600, 0).to_parquet(data / "train.parquet", index=False)
    batches = {
        "clean": blobs(200, 1),
        "dismissed": blobs(200, 2, scale=1.5, shift=3.0),
        "approved": blobs(200, 3, scale=1.5, shift=3.0),
        "auto": blobs(200, 4, scale=1.5, shift=-3.0),
    }
    for name, frame in batches.items():
        frame.to_parquet(data / f"{name}.parquet", index=False)

    cfg = yaml.safe_load((REPO / "configs" / "distributed.yaml").read_text())
    cfg["artifacts_root"] = str(tmp / "artifacts")
    cfg["training"]["device"] = "cpu"  # the test's gpu worker is a CPU process
    cfg["data"] = {"source": str(data / "train.parquet")}
    cfg["model"] = {"hidden_dims": [16, 4]}
    cfg["training"]["pretrain"] = {"epochs": 2}
    cfg["training"]["finetune"] = {"epochs": 4}
    cfg["evaluation"] = {"probe_max_iter": 300}
    # Test-sized training makes probe accuracies noisy by a few points: allow that much, so
    # that the gate's answer turns on reconstruction error, which the retraining does improve.
    cfg["registry"]["gate"] = {"max_probe_accuracy_drop": 0.1}
    config_path = tmp / "loop.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    policy = yaml.safe_load((REPO / "configs" / "drift_policy.yaml").read_text())
    policy["sample_rows"] = 0
    policy["review"] = {"retrain": "required", "drift_alert": "required", "default": "dismiss"}
    policy_path = tmp / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy))

    topo = Topology(
        tmp,
        config_path,
        extra_env={
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",  # runs from Asset events
            "SAE_TRAINING_SCHEDULE": "none",  # training only when drift (or a person) asks
            "SAE_DRIFT_POLICY": str(policy_path),
        },
        concurrency={"default": 2},
    )
    mp = pytest.MonkeyPatch()  # this process talks to the MLflow server as its admin
    try:
        topo.start()
        _mlflow_env(mp, topo)
        wait_for("the monitor DAG", lambda: _dag_parsed(topo, MONITOR), 120)
        t0 = time.perf_counter()
        from sae_pipeline.steps.training import run_training

        trained = run_training("manual__first_champion", str(config_path))
        assert trained["promote"]["promoted"]
        topo.timings["first champion"] = time.perf_counter() - t0
    except BaseException:
        diagnostics = topo.diagnostics()
        topo.stop()
        mp.undo()
        raise RuntimeError(f"the loop's topology did not start\n{diagnostics}") from None
    print(f"\nloop topology: {', '.join(f'{k} {v:.1f} s' for k, v in topo.timings.items())}")
    yield {"topo": topo, "data": data, "cfg": cfg, "times": {}}
    topo.stop()
    mp.undo()


def _dag_parsed(topo: Topology, dag_id: str):
    try:
        return topo.api("GET", f"/dags/{dag_id}")
    except Exception:  # not parsed yet
        return None


def _mlflow_env(mp: pytest.MonkeyPatch, topo: Topology) -> None:
    mp.setenv("MLFLOW_TRACKING_URI", topo.mlflow_url)
    mp.setenv("MLFLOW_TRACKING_USERNAME", topo.mlflow_user)
    mp.setenv("MLFLOW_TRACKING_PASSWORD", topo.mlflow_password)


def _client(topo: Topology):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=topo.mlflow_url, registry_uri=topo.mlflow_url)


def _champion(topo: Topology, name: str) -> str:
    got = topo.mlflow("/registered-models/alias", name=name, alias="champion")
    return got["model_version"]["version"]


def _announce(topo: Topology, path) -> float:
    """An upstream producer's event on sae_new_batches; returns when it was posted."""
    assets = topo.api("GET", "/assets?name_pattern=sae_new_batches")["assets"]
    body = {"asset_id": assets[0]["id"], "extra": {"path": str(path)}}
    t0 = time.perf_counter()
    topo.api("POST", "/assets/events", body)
    return t0


def _new_monitor_run(topo: Topology, seen: set[str]) -> str:
    def created():
        topo.check_alive()
        fresh = [
            r["dag_run_id"]
            for r in topo.dag_runs(MONITOR)
            if r["run_type"] == "asset_triggered" and r["dag_run_id"] not in seen
        ]  # (a scheduled run of the daily timetable may appear too: it finds no batch, skips)
        return fresh[0] if fresh else None

    # One monitor run at a time: an event that arrives during a run starts the next one after.
    run_id = wait_for("the scheduler to start the drift monitor", created, 300, interval=0.5)
    seen.add(run_id)
    return run_id


def _ti_state(topo: Topology, run_id: str, task_id: str, dag_id: str = MONITOR) -> str | None:
    return topo.task_instances(run_id, dag_id).get(task_id, {}).get("state")


def _wait_for_review(topo: Topology, run_id: str) -> dict:
    def waiting():
        topo.check_alive()
        state = _ti_state(topo, run_id, "review")
        if state in ("failed", "upstream_failed", "skipped", "success"):
            raise AssertionError(f"{run_id}: review ended {state}\n{topo.diagnostics()}")
        return state == "awaiting_input"

    wait_for(f"{run_id} to wait for a review", waiting, 180, interval=0.5)
    return topo.api("GET", _hitl_path(run_id))


def _hitl_path(run_id: str) -> str:
    quoted = urllib.parse.quote(run_id)
    return f"/dags/{MONITOR}/dagRuns/{quoted}/taskInstances/review/-1/hitlDetails"


def _answer(topo: Topology, run_id: str, choice: str) -> dict:
    return topo.api("PATCH", _hitl_path(run_id), {"chosen_options": [choice]}, user="reviewer")


def _check_run_tags(topo: Topology, run_id: str) -> dict[str, str]:
    exp = _client(topo).get_experiment_by_name("sae-monitoring")
    found = _client(topo).search_runs(
        [exp.experiment_id], filter_string=f"tags.`sae.dag_run_id` = '{run_id}'"
    )
    assert len(found) == 1, run_id
    return found[0].data.tags


def _training_runs(topo: Topology) -> list[str]:
    return [r["dag_run_id"] for r in topo.dag_runs(TRAINING)]


def test_a_clean_batch_triggers_nothing_and_a_dismissed_drift_trains_nothing(loop):
    topo, data = loop["topo"], loop["data"]
    seen: set[str] = set()
    _announce(topo, data / "clean.parquet")
    clean_run = _new_monitor_run(topo, seen)
    # Announced while the first run works: the scheduler starts its run when the first ends.
    _announce(topo, data / "dismissed.parquet")
    loop["seen"] = seen

    assert topo.wait_for_run(clean_run, 240, MONITOR)["state"] == "success"
    dismissed_run = _new_monitor_run(topo, seen)
    tis = topo.task_instances(clean_run, MONITOR)
    assert tis["review"]["state"] == "success"  # nothing to review: passed straight through
    assert tis["trigger_retraining"]["state"] == "skipped"

    detail = _wait_for_review(topo, dismissed_run)
    assert detail["options"] == ["retrain", "accept", "dismiss"]
    assert "dismissed" in detail["subject"] and detail["body"].startswith("**retrain**")
    assert "file://" not in detail["body"] and "runs:/" not in detail["body"]
    assert "get-artifact?path=" in detail["body"]  # MLflow's http(s) links, nothing else
    answered = _answer(topo, dismissed_run, "dismiss")
    assert answered["responded_by"]["name"] == "reviewer"
    assert topo.wait_for_run(dismissed_run, 240, MONITOR)["state"] == "success"
    assert _ti_state(topo, dismissed_run, "trigger_retraining") == "skipped"
    tags = _check_run_tags(topo, dismissed_run)
    assert (tags["sae.review.choice"], tags["sae.review.by"]) == ("dismiss", "reviewer")
    assert _training_runs(topo) == []  # nothing was trained
    # The encoding DAG ran for both announced batches too.
    assert len(topo.dag_runs(ENCODING)) >= 2


def _wait_for_champion(
    topo: Topology, name: str, before: str, t0: float, training_run: str
) -> tuple[str, float]:
    """The new champion, or a failure that says why it did not come (the training run's end)."""

    def moved_or_ended():
        topo.check_alive()
        now = _champion(topo, name)
        if now != before:
            return ("moved", now)
        run = {r["dag_run_id"]: r for r in topo.dag_runs(TRAINING)}.get(training_run)
        if run and run["state"] in ("success", "failed") and _champion(topo, name) == before:
            return ("ended", run["state"])
        return None

    what = f"@champion to move or {training_run} to end"
    kind, value = wait_for(what, moved_or_ended, 600, interval=1)
    if kind == "ended":
        states = {t: ti["state"] for t, ti in topo.task_instances(training_run, TRAINING).items()}
        newest = max(
            topo.model_versions(name), key=lambda v: int(v["version"]), default={"version": "?"}
        )
        tags = {t["key"]: t["value"] for t in newest.get("tags", []) if "gate" in t["key"]}
        raise AssertionError(
            f"{training_run} ended {value} and @champion stayed v{before}; tasks {states}; "
            f"newest version v{newest['version']} gate tags {tags}"
        )
    return value, time.perf_counter() - t0


def _assert_training_ran_on_the_scheduler(topo: Topology, run_id: str) -> None:
    assert topo.wait_for_run(run_id, 300, TRAINING)["state"] == "success"
    for task_id, ti in topo.task_instances(run_id, TRAINING).items():
        queue = "gpu" if task_id in HEAVY_TASKS else "default"
        assert (ti["state"], ti["queue"], ti["hostname"]) == (
            "success",
            queue,
            WORKER_NAMES[queue],
        ), task_id


def test_an_approved_drift_retrains_under_the_scheduler_and_moves_the_champion(loop):
    topo, data = loop["topo"], loop["data"]
    name = loop["cfg"]["registry"].get("encoder_model_name") or "sae-digits-encoder"
    before = _champion(topo, name)
    t0 = _announce(topo, data / "approved.parquet")
    run_id = _new_monitor_run(topo, loop.setdefault("seen", set()))
    _wait_for_review(topo, run_id)
    waited = time.perf_counter() - t0
    _answer(topo, run_id, "retrain")
    version, elapsed = _wait_for_champion(topo, name, before, t0, f"drift__{run_id}")
    loop["times"]["approved"] = elapsed
    print(f"\nevent -> review {waited:.1f} s; event -> new champion v{version}: {elapsed:.1f} s")

    _assert_training_ran_on_the_scheduler(topo, f"drift__{run_id}")
    tags = _check_run_tags(topo, run_id)
    assert (tags["sae.review.choice"], tags["sae.review.by"]) == ("retrain", "reviewer")
    got = _client(topo).get_model_version(name, version)
    assert got.tags["sae.review.choice"] == "retrain" and got.tags["sae.review.by"] == "reviewer"
    assert got.tags["sae.review.at"] == tags["sae.review.at"]
    assert got.tags["sae.gate.decision"] == "promoted"


def test_a_run_param_cannot_skip_the_deployments_review(loop):
    """The deployment's policy asks for review; this run's `review` param says auto: the run
    waits for a person all the same (issue 22 item 4)."""
    topo, data = loop["topo"], loop["data"]
    run_id = "auto__loop"
    topo.trigger(run_id, {"batch": str(data / "auto.parquet"), "review": "auto"}, MONITOR)
    _wait_for_review(topo, run_id)
    _answer(topo, run_id, "dismiss")
    assert topo.wait_for_run(run_id, 240, MONITOR)["state"] == "success"
    assert _ti_state(topo, run_id, "trigger_retraining") == "skipped"
    tags = _check_run_tags(topo, run_id)
    assert (tags["sae.review.choice"], tags["sae.review.by"]) == ("dismiss", "reviewer")
    assert f"drift__{run_id}" not in _training_runs(topo)
