"""The loop end to end through Airflow, with real Evidently, MLflow and training.

A champion is trained by the training DAG; the batch-encoding DAG encodes a clean batch (with
three broken rows) in mapped shards; the drift monitor finds nothing in the clean batch and
drift in a shifted one, queues a retraining run, and that run (started here with the queued
conf, as a scheduler would) registers a new version whose gate decision is recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

FEATURES = [f"f{i}" for i in range(8)]
BROKEN = {5: ("f2", np.nan), 77: ("f6", np.inf), 301: ("f0", np.nan)}  # row -> (column, value)


def blobs(n: int, seed: int, shift: float = 0.0, spread: float = 1.0) -> pd.DataFrame:
    """Three Gaussian classes in 8 dimensions (fixed centres), with ids and labels."""
    centres = np.random.default_rng(42).normal(0.0, 3.0, size=(3, len(FEATURES)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = centres[y] + spread * rng.normal(size=(n, len(FEATURES))) + shift
    frame = pd.DataFrame(x, columns=FEATURES)
    frame.insert(0, "id", np.arange(n, dtype=np.int64) + 10_000 * (seed + 1))
    frame["target"] = y
    return frame


def _state(run) -> str:
    return str(getattr(run.state, "value", run.state))


def _run(dag_file: str, conf: dict, attr: str):
    from sae_pipeline.demo.airflow_run import run_dag_test, task_results

    run = run_dag_test(REPO / "dags" / dag_file, conf, attr)
    assert _state(run) == "success", (dag_file, _state(run))
    return run, task_results(run)


def _ti_states(run) -> dict[tuple[str, int], str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(
            TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id
        )
        return {(ti.task_id, ti.map_index): str(ti.state) for ti in rows}


@pytest.fixture(scope="module")
def world(airflow_db, tmp_path_factory):
    """A trained champion, the three batches and the DAG params that point at the store."""
    tmp = tmp_path_factory.mktemp("loop")
    config = tmp / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"id_column": "id"},
                "model": {"hidden_dims": [16, 8, 4]},  # 3 layers: the DAG's default layout
                "training": {"pretrain": {"epochs": 2}, "finetune": {"epochs": 6}},
            }
        )
    )
    train = blobs(900, seed=0)
    train.to_parquet(tmp / "train.parquet", index=False)
    clean = blobs(403, seed=1)
    for row, (col, value) in BROKEN.items():
        clean.loc[row, col] = value
    # Small row groups, so that the batch plans into several shards (mapped tasks).
    clean.to_parquet(tmp / "clean.parquet", index=False, row_group_size=100)
    shifted = clean.copy()
    shifted[FEATURES] = shifted[FEATURES] * 1.5 + 2.5
    shifted["id"] += 500_000
    shifted.to_parquet(tmp / "shifted.parquet", index=False)
    store = {
        "config_path": str(config),
        "artifacts_root": str(tmp / "artifacts"),
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    _, trained = _run(
        "sae_training.py", {**store, "data_source": str(tmp / "train.parquet")}, "training_dag"
    )
    assert trained["promote"]["promoted"] is True
    return {"tmp": tmp, "store": store, "trained": trained, "clean": clean}


@pytest.fixture(scope="module")
def encoded(world):
    conf = {**world["store"], "batch": str(world["tmp"] / "clean.parquet"), "shard_rows": 200}
    conf["chunk_rows"] = 64  # chunks smaller than row groups and shards
    return _run("sae_batch_encoding.py", conf, "encoding_dag")


@pytest.fixture(scope="module")
def checks(world):
    store = world["store"]
    return {
        name: _run(
            "sae_drift_monitor.py", {**store, "batch": str(world["tmp"] / f"{name}.parquet")},
            "drift_dag",
        )
        for name in ("clean", "shifted")
    }  # fmt: skip


def test_encoding_dag_maps_shards_and_accounts_for_every_row(world, encoded):
    from sae_pipeline.steps import encoding

    run, results = encoded
    manifest = results["commit"]
    assert manifest["rows_in"] == len(world["clean"]) == 403
    assert manifest["rows_encoded"] == 400 and manifest["rows_quarantined"] == 3
    assert manifest["rows_in"] == manifest["rows_encoded"] + manifest["rows_quarantined"]
    mapped = [k for k in _ti_states(run) if k[0] == "encode_shard"]
    assert sorted(i for _, i in mapped) == [0, 1, 2]  # 5 row groups of 100 -> 200+200+3
    quarantine = encoding.read_quarantine(manifest["output"])
    assert sorted(quarantine["_row"]) == sorted(BROKEN)
    assert sorted(quarantine["id"]) == sorted(world["clean"]["id"].iloc[list(BROKEN)])
    reasons = dict(zip(quarantine["_row"], quarantine["_quarantine_reason"], strict=True))
    assert reasons[5] == "column 'f2': missing value"
    assert reasons[77] == "column 'f6': infinite value inf"
    # Published atomically: no staging folder left next to the output.
    parent = Path(manifest["output"]).parent
    assert [p.name for p in parent.iterdir()] == [Path(manifest["output"]).name]


def test_encoded_codes_equal_the_trained_model_on_the_same_rows(world, encoded):
    from sae_pipeline import StackedAutoencoder
    from sae_pipeline.data.scaling import apply_scaler
    from sae_pipeline.steps import encoding
    from sae_pipeline.steps import training as steps

    manifest = encoded[1]["commit"]
    out = encoding.read_output(manifest["output"])
    rows = world["clean"].drop(index=list(BROKEN))
    assert out["row"].tolist() == rows.index.tolist()
    assert out["id"].tolist() == rows["id"].tolist()
    trained = steps.load_encoder(world["trained"]["prepare"])
    expected = trained.transform(rows[FEATURES], output="all")
    codes = out[trained.code_columns].to_numpy()
    np.testing.assert_allclose(codes, expected[trained.code_columns], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["reconstruction_error"], expected["reconstruction_error"], rtol=1e-4, atol=1e-7
    )
    # The same network inside the scikit-learn estimator gives the same codes.
    net = trained.net
    sae = StackedAutoencoder(hidden_dims=tuple(net.arch.hidden_dims))
    sae.net_, sae.n_components_, sae.n_features_in_ = net, net.arch.hidden_dims[-1], len(FEATURES)
    by_estimator = sae.transform(apply_scaler(trained.scaler, rows[FEATURES].to_numpy()))
    np.testing.assert_allclose(codes, by_estimator, rtol=1e-5, atol=1e-6)


def test_encoding_dag_announces_the_output_on_its_asset(encoded):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    manifest = encoded[1]["commit"]
    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.uri == "sae://batches/encoded")
            .all()
        )
        extras = [dict(e.extra or {}) for e in events]
    assert any(e.get("path") == manifest["output"] for e in extras), extras
    assert any(e.get("rows_quarantined") == 3 for e in extras)


def test_clean_batch_triggers_nothing(checks):
    from sae_pipeline.demo.loop import queued_run

    run, results = checks["clean"]
    summary = results["check"]
    assert summary["drift_detected"] is False and summary["retrain_triggered"] is False
    assert summary["decision"] == "no_drift"
    assert summary["rows_in"] == 403 and summary["rows_quarantined"] == 3
    states = _ti_states(run)
    assert states[("retraining_conf", -1)] == "success"  # ran, returned None: short-circuit
    assert states[("trigger_retraining", -1)] == "skipped"
    assert queued_run("sae_training", f"drift__{run.run_id}") is None


def test_a_run_without_any_batch_is_skipped(world, checks):
    from sae_pipeline.demo.airflow_run import run_dag_test

    # No batch param and no event on the new-batches Asset: what a scheduled run sees before
    # the first batch is announced.
    run = run_dag_test(REPO / "dags/sae_drift_monitor.py", world["store"], "drift_dag")
    states = _ti_states(run)
    assert states[("prepare", -1)] == "skipped"
    assert {s for (t, _), s in states.items()} == {"skipped"}


def test_shifted_batch_is_drift_and_queues_retraining_with_the_new_rows(world, checks):
    from sae_pipeline.demo.loop import queued_run

    run, results = checks["shifted"]
    summary = results["check"]
    assert summary["drift_detected"] is True and summary["retrain_triggered"] is True
    # The shifted batch keeps its labels, so the champion's probe may show the drop too.
    assert set(summary["drifted_signals"]) - {"downstream"} == {
        "raw",
        "codes",
        "reconstruction_error",
    }
    assert summary["drift_share"]["raw"] == pytest.approx(1.0)
    queued = queued_run("sae_training", f"drift__{run.run_id}")
    assert queued is not None and queued["state"] == "queued"
    assert queued["conf"] == results["retraining_conf"]
    data = pd.read_parquet(queued["conf"]["data_source"])
    assert len(data) == 900 + 400  # the champion's snapshot and the batch's valid rows
    assert set(data.columns) == {"id", "target", *FEATURES}


def test_each_check_is_logged_to_mlflow_with_reports_and_a_summary(world, checks):
    from mlflow import MlflowClient

    uri = world["store"]["tracking_uri"]
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name in ("clean", "shifted"):
        summary = checks[name][1]["check"]
        run = c.get_run(summary["mlflow_run_id"])
        exp = c.get_experiment(run.info.experiment_id)
        assert exp.name == "sae-monitoring"
        note = run.data.tags["mlflow.note.content"]
        assert summary["decision"] in note and "drift share" in note
        assert run.data.tags["sae.model_version"] == summary["model_version"] == "1"
        for signal in ("raw", "codes", "reconstruction_error"):
            assert run.data.metrics[f"drift_share_{signal}"] == summary["drift_share"][signal]
        files = {f.path for f in c.list_artifacts(run.info.run_id, "drift")}
        for signal in ("raw", "codes", "reconstruction_error"):
            assert {f"drift/{signal}.html", f"drift/{signal}.json"} <= files
        assert "drift/summary.json" in files
        assert (Path(summary["report_dir"]) / "raw.html").stat().st_size > 10_000


def test_cli_encodes_and_checks_the_same_way_outside_airflow(world, encoded, capsys, tmp_path):
    import json

    from sae_pipeline import cli
    from sae_pipeline.steps import encoding

    store = world["store"]
    common = [
        "--config", store["config_path"],
        "--set", f"artifacts_root={store['artifacts_root']}",
        "--set", f"registry.tracking_uri={store['tracking_uri']}",
    ]  # fmt: skip
    batch = str(world["tmp"] / "clean.parquet")
    out = tmp_path / "encoded"
    assert cli.main(["encode", "--batch", batch, "--output", str(out), "--chunk-rows", "100",
                     *common]) == 0  # fmt: skip
    printed = capsys.readouterr()
    manifest = json.loads(printed.out)
    assert (manifest["rows_in"], manifest["rows_encoded"], manifest["rows_quarantined"]) == (
        403, 400, 3,
    )  # fmt: skip
    assert "encode" in printed.err  # the progress bar
    dag_output = encoding.read_output(encoded[1]["commit"]["output"])
    pd.testing.assert_frame_equal(encoding.read_output(str(out)), dag_output)
    assert cli.main(["drift", "--batch", batch, "--policy-set", "min_rows=1000", *common]) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["decision"] == "not_judged" and "fewer than min_rows=1000" in check["reason"]


def test_retraining_registers_a_challenger_and_records_the_gate(world, checks):
    from mlflow import MlflowClient

    conf = checks["shifted"][1]["retraining_conf"]
    _, results = _run("sae_training.py", conf, "training_dag")
    uri = world["store"]["tracking_uri"]
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = results["register"]["encoder_model_name"]
    new = c.get_model_version(name, results["register"]["encoder_version"])
    assert str(new.version) == "2"
    assert "challenger" in new.aliases
    gate = results["promote"]
    assert new.tags["sae.gate.decision"] == ("promoted" if gate["promoted"] else "rejected")
    assert new.tags["sae.gate.reason"] == gate["reason"]
    assert new.tags["sae.gate.compared_to"] == "1"
    basis = new.tags["sae.gate.basis"]
    assert basis.startswith("both measured on ") and "of the challenger's test rows" in basis
    # rows the champion trained on are left out of the comparison (the retraining data holds
    # the champion's training snapshot)
    assert "left out: the champion trained on them" in basis
    champion = str(c.get_model_version_by_alias(name, "champion").version)
    assert champion == ("2" if gate["promoted"] else "1")
    # What the demo's summary reports as the champion after its loop: the registry's answer.
    from sae_pipeline.demo.demo import registry_state

    reported, versions = registry_state(uri, name, results["register"]["scaler_model_name"])
    assert reported == champion
    assert {"model": name, "version": champion, "aliases": sorted(new.aliases)} in versions or (
        not gate["promoted"]
    )
    metrics = c.get_run(new.run_id).data.metrics
    # The gate measures on the challenger's test rows the champion never saw, a subset of the
    # rows `evaluate` used: a different number, of the same model.
    assert 0 < metrics["gate_challenger_test_mse"] != results["evaluate"]["test_mse"]
    # The champion was trained on the clean data only: the shifted test rows cost it dearly.
    assert metrics["gate_champion_test_mse"] > metrics["gate_challenger_test_mse"]
