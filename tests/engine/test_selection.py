import numpy as np
from sklearn.datasets import load_digits

from sae_pipeline.config import build_config
from sae_pipeline.engine.estimator import StackedAutoencoder
from sae_pipeline.engine.selection import better, estimator_params, select_hyperparameters


def test_select_hyperparameters_picks_the_best_code_size_without_airflow():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)[:600]
    base = {"pretrain_epochs": 3, "finetune_epochs": 8, "random_state": 0}
    candidates = [{"hidden_dims": (32, 2)}, {"hidden_dims": (32, 12)}]
    best, rows = select_hyperparameters(x, y[:600], candidates, base=base)
    assert [r["params"] for r in rows] == candidates
    assert all(0 < r["probe_accuracy"] <= 1 and r["val_mse"] > 0 for r in rows)
    # 12 code units separate ten digits far better than 2 do.
    assert rows[1]["probe_accuracy"] > rows[0]["probe_accuracy"]
    assert best["hidden_dims"] == (32, 12) and best["finetune_epochs"] == 8


def test_better_prefers_accuracy_then_error():
    a, b = {"probe_accuracy": 0.9, "val_mse": 0.2}, {"probe_accuracy": 0.8, "val_mse": 0.1}
    assert better(a, b, "probe_accuracy") and not better(b, a, "probe_accuracy")
    assert better(b, a, "val_mse")
    assert better({"probe_accuracy": 0.9, "val_mse": 0.1}, a, "probe_accuracy")


def test_estimator_params_mirror_the_pipeline_config():
    cfg = build_config({}, {"model.hidden_dims": [32, 4], "training.finetune.epochs": 7})
    sae = StackedAutoencoder(**estimator_params(cfg))
    assert sae.hidden_dims == (32, 4) and sae.finetune_epochs == 7
    assert sae.noise == cfg.model.noise and sae.random_state == cfg.training.seed
