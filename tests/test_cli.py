"""``sae-pipeline train``: a new run each time, ``--resume`` only with the run's own config."""

from __future__ import annotations

import json

import pytest

from sae_pipeline import storage
from sae_pipeline.cli import main
from tests.conftest import TINY


def _sets(store: dict, **more) -> list[str]:
    out = []
    for key, value in {**TINY, **store, **more}.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def _train(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def _history_len(result: dict) -> int:
    history = storage.read_json(storage.join(result["artifacts"], "finetune", "history.json"))
    return len(history["train_loss"])


def _mlflow_runs(store: dict) -> int:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=store["registry.tracking_uri"])
    exp = c.get_experiment_by_name("sae-training")
    return len(c.search_runs([exp.experiment_id]))


@pytest.mark.slow
def test_train_twice_gives_two_runs_and_a_resume_must_keep_the_config(store, capsys):
    code, first, err = _train(capsys, *_sets(store))
    assert code == 0, err
    code, second, err = _train(capsys, *_sets(store, **{"training.finetune.epochs": 3}))
    assert code == 0, err
    # Two runs, each with its own results: the second trained 3 fine-tuning epochs, not 2.
    assert first["run_id"] != second["run_id"]
    assert (_history_len(first), _history_len(second)) == (2, 3)
    assert second["register"]["encoder_version"] != first["register"]["encoder_version"]
    # Where the registry is, for another process.
    assert second["tracking_uri"] == store["registry.tracking_uri"]
    assert f"export MLFLOW_TRACKING_URI={store['registry.tracking_uri']}" in err

    # A resume with another config is refused, naming the field; nothing is changed.
    config_uri = storage.join(first["artifacts"], "config.json")
    stored, runs = storage.read_json(config_uri), _mlflow_runs(store)
    code, _, err = _train(
        capsys, "--resume", first["run_id"], *_sets(store, **{"training.finetune.epochs": 3})
    )
    assert code == 2
    assert "training.finetune.epochs: 2 -> 3" in err and err.strip().count("\n") == 0
    assert storage.read_json(config_uri) == stored
    assert _mlflow_runs(store) == runs

    # With its own config, the resume returns that run's results (all steps were done).
    code, resumed, err = _train(capsys, "--resume", first["run_id"], *_sets(store))
    assert code == 0, err
    assert resumed["register"] == first["register"] and resumed["evaluate"] == first["evaluate"]
    assert _mlflow_runs(store) == runs


def test_resume_of_a_missing_run_and_a_taken_run_id_are_refused(store, capsys, tmp_path):
    code, _, err = _train(capsys, "--resume", "nope", *_sets(store))
    assert code == 2 and "no run 'nope' to resume" in err
    assert not (tmp_path / "artifacts" / "runs" / "nope").exists()
    (tmp_path / "artifacts" / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "artifacts" / "runs" / "mine" / "config.json").write_text("{}")
    code, _, err = _train(capsys, "--run-id", "mine", *_sets(store))
    assert code == 2 and "--resume mine" in err
    assert (tmp_path / "artifacts" / "runs" / "mine" / "config.json").read_text() == "{}"
    code, _, err = _train(capsys, "--run-id", "a", "--resume", "b", *_sets(store))
    assert code == 2 and "leave out --run-id" in err
