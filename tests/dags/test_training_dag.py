"""The training DAG end to end through Airflow, with a real MLflow store and registry."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sae_pipeline.data.sources import load_sklearn
from sae_pipeline.steps import training as steps
from sae_pipeline.steps.training import run_training

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


# Two candidate code layers: the run maps a selection task over them and trains the winner.
CANDIDATES = [{"model.hidden_dims": [64, 10]}, {"model.hidden_dims": [24, 10]}]


@pytest.fixture(scope="module")
def dag_run(airflow_db, tmp_path_factory):
    import yaml

    from sae_pipeline.demo.airflow_run import load_dag_module, task_results

    tmp = tmp_path_factory.mktemp("dagrun")
    config = tmp / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"hidden_dims": [64, 10]},
                "training": {"finetune": {"epochs": 4}, "pretrain": {"epochs": 2}},
                "selection": {"candidates": CANDIDATES},
            }
        )
    )
    conf = {
        "artifacts_root": str(tmp / "artifacts"),
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "pretrain_epochs": 3,
        "finetune_epochs": 6,
    }
    module = load_dag_module(REPO / "dags" / "sae_training.py")
    run = module.build_training_dag(str(config)).test(run_conf={"config_path": str(config), **conf})
    return run, task_results(run), conf


def test_selection_maps_over_candidates_and_carries_the_winner_on(dag_run):
    from mlflow import MlflowClient

    from sae_pipeline import storage
    from sae_pipeline.engine.selection import better

    _, results, conf = dag_run
    ctx = results["select_candidate"]
    scored = storage.read_json(storage.join(ctx["run_dir"], "selection", "results.json"))
    assert [r["candidate"] for r in scored] == CANDIDATES
    best = scored[0] if better(scored[0], scored[1], "probe_accuracy") else scored[1]
    assert ctx["selected"] == best["candidate"]
    assert steps.load_trained(ctx).arch.hidden_dims == best["candidate"]["model.hidden_dims"]
    c = MlflowClient(conf["tracking_uri"], conf["tracking_uri"])
    children = c.search_runs(
        [c.get_run(ctx["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{ctx['mlflow_run_id']}'",
    )
    assert len(children) == 2
    assert all("probe_accuracy" in r.data.metrics for r in children)


def test_dag_run_succeeds_and_registers_a_champion(dag_run):
    run, results, _conf = dag_run
    assert str(getattr(run.state, "value", run.state)) == "success"
    assert results["promote"]["promoted"] is True
    assert results["promote"]["champion_version"] == results["register"]["encoder_version"]
    metrics = results["evaluate"]
    for key in ("test_mse", "test_mae", "probe_accuracy_sae", "probe_accuracy_raw"):
        assert 0 < metrics[key] <= 1, key
    # Quality against baselines computed here on the run's own split, not a bare constant: an
    # untrained network of the champion's shape (the best of three seeds) and PCA with as many
    # components as its code. At this test's budget (3 + 6 epochs) the codes do not reach
    # PCA's probe accuracy (bench-quality compares at full budget); they must beat the shape.
    baselines = same_run_baselines(results["prepare"], steps.load_trained(results["prepare"]))
    assert metrics["probe_accuracy_sae"] == pytest.approx(baselines["trained_probe"])
    assert metrics["probe_accuracy_sae"] > baselines["untrained_probe"], baselines
    assert metrics["test_mse"] < 0.5 * baselines["untrained_mse"], baselines
    assert metrics["probe_accuracy_pca"] == pytest.approx(baselines["pca_probe"])


def same_run_baselines(ctx, net) -> dict[str, float]:
    """Probe accuracy and test MSE of ``net`` (the run's trained network), of untrained
    networks of its shape (best of three seeds) and of PCA with as many components as its
    code, all on the run's own scaled split, with a probe fitted here."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sae_pipeline import storage
    from sae_pipeline.engine import trainer
    from sae_pipeline.engine.net import build_net
    from sae_pipeline.steps.training import _dataset

    data = _dataset(ctx)
    x = storage.read_arrays(storage.join(ctx["run_dir"], "scaler", "scaled.npz"))
    y_train, y_test = data["y_train"], data["y_test"]

    def probe(f_train, f_test):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        return float(model.fit(f_train, y_train).score(f_test, y_test))

    def of(n):
        codes = [trainer.encode_array(n, x[p]) for p in ("train", "test")]
        mse = float(np.mean((trainer.reconstruct_array(n, x["test"]) - x["test"]) ** 2))
        return probe(*codes), mse

    untrained = [of(build_net(net.arch, seed=s)) for s in range(3)]
    k = net.arch.hidden_dims[-1]
    pca = PCA(n_components=k, random_state=0).fit(x["train"])
    trained_probe, trained_mse = of(net)
    return {
        "trained_probe": trained_probe,
        "trained_mse": trained_mse,
        "untrained_probe": max(u[0] for u in untrained),
        "untrained_mse": min(u[1] for u in untrained),
        "pca_probe": probe(pca.transform(x["train"]), pca.transform(x["test"])),
    }


def test_mlflow_run_holds_config_losses_metrics_and_lineage(dag_run):
    from mlflow import MlflowClient

    _, results, conf = dag_run
    ctx = results["prepare"]
    c = MlflowClient(conf["tracking_uri"], conf["tracking_uri"])
    run = c.get_run(ctx["mlflow_run_id"])
    assert run.data.params["training.pretrain.epochs"] == "3"
    assert run.data.params["model.hidden_dims"] == "[64, 10]"
    for layer in (1, 2):
        history = c.get_metric_history(run.info.run_id, f"pretrain_layer{layer}_train_loss")
        assert [m.step for m in history] == [0, 1, 2]
    assert len(c.get_metric_history(run.info.run_id, "finetune_val_loss")) == 6
    assert "probe_accuracy_pca" in run.data.metrics
    plots = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    expected = {"loss_curves.png", "reconstructions.png", "code_map.png", "first_layer_filters.png"}
    assert {f"plots/{name}" for name in expected} <= plots
    name = results["register"]["encoder_model_name"]
    version = c.get_model_version(name, results["register"]["encoder_version"])
    assert set(version.aliases) == {"champion", "challenger"}
    for tag in ("sae.data_hash", "sae.dag_run_id", "sae.code_version", "sae.config_hash"):
        assert version.tags[tag], tag
    assert version.tags["sae.dag_run_id"] == ctx["run_id"]


def test_registered_champion_reproduces_codes_and_scaling_in_a_new_process(dag_run, tmp_path):
    _, results, conf = dag_run
    reg = results["register"]
    frame = load_sklearn("digits").drop(columns="target")
    script = textwrap.dedent(
        f"""
        import mlflow, mlflow.pyfunc, numpy as np
        from sae_pipeline.data.sources import load_sklearn
        mlflow.set_tracking_uri({conf["tracking_uri"]!r})
        frame = load_sklearn("digits").drop(columns="target")
        encoder = mlflow.pyfunc.load_model("models:/{reg["encoder_model_name"]}@champion")
        scaler = mlflow.pyfunc.load_model("models:/{reg["scaler_model_name"]}@champion")
        np.save({str(tmp_path / "codes.npy")!r}, encoder.predict(frame).to_numpy())
        np.save({str(tmp_path / "scaled.npy")!r}, scaler.predict(frame).to_numpy())
        """
    )
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}  # nothing unpickled
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    encoder = steps.load_encoder(results["prepare"])
    expected = encoder.transform(frame).to_numpy()
    np.testing.assert_allclose(np.load(tmp_path / "codes.npy"), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.load(tmp_path / "scaled.npy"), encoder.scaler.transform(frame.to_numpy()), atol=1e-12
    )
    assert expected.shape == (len(frame), 10)
    assert np.ptp(expected, axis=0).min() > 0  # every code unit is alive


def test_a_worse_retrain_stays_challenger_and_the_reason_is_recorded(dag_run):
    from mlflow import MlflowClient

    _, results, conf = dag_run
    overrides = {
        "artifacts_root": conf["artifacts_root"],
        "registry.tracking_uri": conf["tracking_uri"],
        "training.pretrain.epochs": 1,
        "training.finetune.epochs": 0,  # pretraining only: worse reconstruction than the champion
    }
    second = run_training("manual__worse", overrides=overrides)
    assert second["promote"]["promoted"] is False
    assert "test MSE" in second["promote"]["reason"]
    c = MlflowClient(conf["tracking_uri"], conf["tracking_uri"])
    name = second["register"]["encoder_model_name"]
    new = c.get_model_version(name, second["register"]["encoder_version"])
    assert new.tags["sae.gate.decision"] == "rejected"
    assert new.tags["sae.gate.reason"] == second["promote"]["reason"]
    champion = c.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == results["register"]["encoder_version"]
    assert str(c.get_model_version_by_alias(name, "challenger").version) == str(new.version)
    # Re-running the same run registers nothing new (idempotent steps).
    again = run_training("manual__worse", overrides=overrides)
    assert again["register"] == second["register"]
    assert json.dumps(again["evaluate"], sort_keys=True) == json.dumps(
        second["evaluate"], sort_keys=True
    )
