"""Ingest and validation inside the pipeline: a DAG run that fails on bad data and registers
nothing, and a training run whose data comes from a PostgreSQL table."""

from pathlib import Path

import pytest
import sqlalchemy

from sae_pipeline import storage
from tests.conftest import TINY
from tests.ingest_helpers import clean_frame, postgres_database, write_csv

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def task_states(dag_run) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
        )
        return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in rows}


def test_a_dag_run_on_bad_data_fails_in_validate_with_the_reason_and_registers_nothing(
    airflow_db, tmp_path, capfd
):
    from mlflow import MlflowClient

    from sae_pipeline.demo.airflow_run import run_dag_test

    frame = clean_frame(n=60).astype({"b": object})
    frame.loc[:19, "b"] = "oops"  # 20 of 60 rows: far above the 10% ceiling
    source = write_csv(frame, tmp_path / "batch.csv")
    conf = {
        "data_source": str(source),
        "artifacts_root": str(tmp_path / "artifacts"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "pretrain_epochs": 1,
        "finetune_epochs": 1,
    }
    run = run_dag_test(REPO / "dags" / "sae_training.py", conf)
    log = "".join(capfd.readouterr())

    assert str(getattr(run.state, "value", run.state)) == "failed"
    states = task_states(run)
    assert states["ingest"] == "success"
    assert states["validate"] == "failed"  # once: bad data is not retried
    assert states["split"] == states["register"] == "upstream_failed"
    message = "20 of 60 rows (33%) fail validation"
    assert message in log, log[-3000:]
    assert "column 'b' has 20 non-numeric value(s), e.g. 'oops' at row 0" in log
    # nothing registered, no snapshot left behind
    c = MlflowClient(conf["tracking_uri"], conf["tracking_uri"])
    assert c.search_registered_models() == []
    run_dir = storage.run_dir(conf["artifacts_root"], storage.run_key(run.run_id))
    assert storage.exists(storage.join(run_dir, "ingest", "raw.parquet"))
    assert not storage.exists(storage.join(run_dir, "validate"))


def test_training_from_a_postgresql_table(store):
    import mlflow
    from mlflow import MlflowClient

    from sae_pipeline.data.snapshot import read_snapshot
    from sae_pipeline.data.sources import load_sklearn
    from sae_pipeline.registry import bundle
    from sae_pipeline.steps.training import run_training

    frame = load_sklearn("wine")
    with postgres_database() as url:
        engine = sqlalchemy.create_engine(url)
        frame.to_sql("wine", engine, index=False)
        with engine.begin() as conn:  # two rows a user would not want to train on
            conn.execute(
                sqlalchemy.text(
                    "update wine set alcohol = null where ctid in (select ctid from wine limit 1)"
                )
            )
            conn.execute(sqlalchemy.text("insert into wine (alcohol, target) values (13.0, 1)"))
        engine.dispose()
        overrides = {
            **store,
            **TINY,
            "data.source": url,
            "data.query": "select * from wine",
            "registry.encoder_model_name": "sae-wine-encoder",
            "registry.scaler_model_name": "sae-wine-scaler",
        }
        result = run_training("postgres", overrides=overrides)

    v = result["validate"]
    assert (v["rows_in"], v["rows_accepted"], v["rows_quarantined"]) == (179, 177, 2)
    ctx = result["context"]
    snap = read_snapshot(storage.join(ctx["run_dir"], "validate"), verify=True)
    assert len(snap) == 177
    manifest = storage.read_json(v["manifest"])
    assert manifest["source"].startswith("postgresql+psycopg2://postgres@127.0.0.1:5432/")
    contract = manifest["contract"]
    assert contract["feature_columns"] == [c for c in frame.columns if c != "target"]

    uri = store["registry.tracking_uri"]
    c = MlflowClient(uri, uri)
    run = c.get_run(ctx["mlflow_run_id"])
    assert run.data.metrics["rows_in"] == 179
    assert run.data.metrics["rows_accepted"] == 177
    assert run.data.metrics["rows_quarantined"] == 2
    assert run.data.tags["sae.data_hash"] == v["content_hash"]
    assert {a.path for a in c.list_artifacts(run.info.run_id, "data")} == {
        "data/manifest.json",
        "data/quarantine.parquet",
    }
    reg = result["register"]
    version = c.get_model_version(reg["encoder_model_name"], reg["encoder_version"])
    assert version.tags["sae.data_hash"] == v["content_hash"]
    # the contract (with training ranges) and the input example travel with the registered model
    model_uri = f"models:/{reg['encoder_model_name']}/{reg['encoder_version']}"
    mlflow.set_tracking_uri(uri)
    encoder = bundle.load_encoder(model_uri, uri)
    assert encoder.contract.to_dict() == contract
    assert contract["feature_ranges"]["alcohol"][0] == pytest.approx(snap["alcohol"].min())
    example = mlflow.models.Model.load(model_uri).load_input_example(model_uri)
    assert list(example.columns) == contract["feature_columns"]
