"""The training steps on data: validate against a configured contract, then split."""

from __future__ import annotations

import pandas as pd
import pytest

from sae_pipeline import storage
from sae_pipeline.config import build_config
from sae_pipeline.data.snapshot import read_manifest, write_snapshot
from sae_pipeline.data.validation import validate_batch
from sae_pipeline.steps import training as steps
from tests.ingest_helpers import clean_frame


def test_an_unlabelled_batch_against_a_labelled_contract_splits(tmp_path):
    cfg = build_config({}, {"model.hidden_dims": [4, 2]})
    contract = validate_batch(clean_frame(), cfg.data).contract  # recorded with a label
    assert contract.label_column == "target"
    run_dir = str(tmp_path / "run")
    ctx = {"run_dir": run_dir, "config_uri": storage.join(run_dir, "config.json")}
    storage.write_json(ctx["config_uri"], cfg.model_dump(mode="json"))
    unlabelled = clean_frame(n=60, seed=1).drop(columns=["target"])
    write_snapshot(unlabelled, cfg.data, storage.join(run_dir, "validate"), contract)
    assert read_manifest(storage.join(run_dir, "validate"))["contract"]["label_column"] is None
    out = steps.split(ctx)  # was: KeyError 'target'
    assert out["rows_train"] + out["rows_val"] + out["rows_test"] == 60


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_large_sources_are_ingested_and_validated_in_chunks(tmp_path, store, caplog, suffix):
    """The DAG's ingest and validate steps stream a Parquet or CSV source past
    data.in_memory_max_bytes, and give the snapshot the in-memory steps give."""
    import logging

    src = tmp_path / f"src.{suffix}"
    if suffix == "csv":
        clean_frame(n=400).to_csv(src, index=False)
    else:
        clean_frame(n=400).to_parquet(src, index=False)
    caplog.set_level(logging.INFO)
    hashes = {}
    for name, limit in (("memory", 2**30), ("stream", 0)):
        overrides = {**store, "data.source": str(src), "data.in_memory_max_bytes": limit}
        ctx = steps.prepare(f"run-{name}", None, overrides)
        raw = steps.ingest(ctx)
        assert raw.get("mode", "memory") == name
        hashes[name] = (raw["raw_hash"], steps.validate(ctx)["content_hash"])
        assert steps.split(ctx)["rows_train"] > 0
    assert hashes["stream"] == hashes["memory"]
    assert "streamed in chunks of 65536 rows" in caplog.text


@pytest.mark.slow
def test_a_fully_streamed_run_registers_and_its_successor_meets_the_gate(tmp_path, store):
    """Ingest to promotion with everything streamed, twice: the second run's gate measures
    both models on its test sample, leaving out the rows the champion trained on."""
    import numpy as np

    rng = np.random.default_rng(0)
    frame = clean_frame(n=600)
    frame.to_parquet(tmp_path / "a.parquet", index=False)
    more = clean_frame(n=300, seed=5)
    more[[c for c in more.columns if c != "target"]] += rng.normal(0, 0.01, (300, 1))
    # New rows first: the old ones move to other positions, so other parts of the hash split.
    pd.concat([more, frame], ignore_index=True).to_parquet(tmp_path / "b.parquet", index=False)
    base = {
        **store,
        "data.in_memory_max_bytes": 0,
        "training.in_memory_max_bytes": 0,
        "model.hidden_dims": [8, 3],
        "training.pretrain.epochs": 1,
        "training.finetune.epochs": 2,
        "evaluation.probe_max_iter": 200,
    }
    first = steps.run_training("s1", None, {**base, "data.source": str(tmp_path / "a.parquet")})
    assert first["split"]["mode"] == "stream" and first["promote"]["promoted"]
    # fit_scaler stored the training part once as a row cache, row for row the part's rows,
    # scaled as serving scales them (float64, then float32)
    from sae_pipeline.data import row_cache
    from sae_pipeline.data.scaling import apply_scaler, from_state
    from sae_pipeline.steps import _training_stream as ts

    ctx = first["context"]
    cache = row_cache.RowCache.open(storage.join(ctx["run_dir"], "scaler", "train_rows"))
    assert cache is not None and cache.rows == first["split"]["rows_train"] and cache.scaled
    scaler = from_state(storage.read_json(storage.join(ctx["run_dir"], "scaler", "scaler.json")))
    np.testing.assert_array_equal(
        np.concatenate(list(cache.iter_chunks())),
        apply_scaler(scaler, np.concatenate(list(ts.part_chunks(ctx, "train")))),
    )
    second = steps.run_training("s2", None, {**base, "data.source": str(tmp_path / "b.parquet")})
    from sae_pipeline.config import build_config
    from sae_pipeline.registry import tracking
    from sae_pipeline.registry.gate import gate_decision
    from tests.gate_check import assert_gate_measured, expected_gate

    cfg = build_config({}, base)
    version = second["register"]["encoder_version"]
    client = tracking.client(cfg)
    name = cfg.registry.encoder_model_name
    # The gate measured the rows and spaces it should (recomputed here apart from it) ...
    assert_gate_measured(client, name, version, second["context"], ctx)
    # ... and decided on those numbers: the decision and reason follow from them.
    expected = expected_gate(second["context"], ctx)
    promoted, reason = gate_decision(expected["challenger"], expected["champion"], cfg)
    assert (second["promote"]["promoted"], second["promote"]["reason"]) == (promoted, reason)
    assert client.get_model_version(name, version).tags["sae.gate.decision"] == (
        "promoted" if promoted else "rejected"
    )
