"""Registered models for the registry tests: a small encoder on the digits, in a SQLite store."""

from __future__ import annotations

import numpy as np
import pytest

from sae_pipeline.config import build_config
from sae_pipeline.data.contract import Contract
from sae_pipeline.data.scaling import fit_scaler
from sae_pipeline.data.sources import load_sklearn
from sae_pipeline.engine.encoder import Encoder
from sae_pipeline.engine.net import Architecture, build_net


def make_encoder(frame, kind: str = "minmax", seed: int = 0, **arch) -> Encoder:
    """An untrained (seeded) encoder with a fitted scaler: parity needs no training."""
    import torch

    features = [c for c in frame.columns if c != "target"]
    spec = {"hidden_dims": [16, 4], "output_activation": "sigmoid", **arch}
    net = build_net(Architecture(input_dim=len(features), **spec), seed=seed).eval()
    if spec.get("batch_norm"):  # running statistics away from (0, 1), so batch norm matters
        gen = torch.Generator().manual_seed(seed)
        for m in net.norms:
            m.running_mean.uniform_(-0.3, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    x = frame[features].to_numpy(dtype=np.float64)
    contract = Contract(features, {c: str(frame[c].dtype) for c in features}, "target")
    return Encoder(contract, fit_scaler(kind, x[: len(x) // 2]), net)


@pytest.fixture(scope="session")
def digits():
    return load_sklearn("digits")


@pytest.fixture(scope="session")
def registered(tmp_path_factory, digits):
    """Encoder and scaler registered twice (versions 1 and 2) in a fresh store; 2 is champion."""
    from sae_pipeline.registry import tracking

    root = tmp_path_factory.mktemp("registry")
    cfg = build_config(
        {},
        {
            "artifacts_root": str(root / "artifacts"),
            "registry.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        },
    )
    features = digits.drop(columns="target")
    encoders = {}
    for version, seed in (("1", 1), ("2", 0)):
        encoder = make_encoder(digits, seed=seed, batch_norm=True)
        run = tracking.find_or_create_run(cfg, f"run{version}", {})
        versions = tracking.register_encoder(
            cfg, run, f"run{version}", encoder, features.head(20), {"sae.mlflow_run_id": run}
        )
        assert versions == {"encoder": version, "scaler": version}
        encoders[version] = encoder
    for name in (cfg.registry.encoder_model_name, cfg.registry.scaler_model_name):
        tracking.set_alias(cfg, name, tracking.CHAMPION, "2")
    return {
        "cfg": cfg,
        "uri": tracking.tracking_uri(cfg),
        "encoder_name": cfg.registry.encoder_model_name,
        "scaler_name": cfg.registry.scaler_model_name,
        "encoders": encoders,
        "encoder": encoders["2"],
        "frame": features,
    }
