"""The drift check's downstream signal: the champion's probe scored on a labelled batch.

The batch is streamed in chunks (valid, labelled rows only), encoded with the pinned champion,
and the registered probe's hits are counted; memory stays bounded by the chunk size. The
judgement itself is ``sae_pipeline.monitoring.downstream``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sae_pipeline.data import batches
from sae_pipeline.monitoring.downstream import judge
from sae_pipeline.registry import champion
from sae_pipeline.registry.champion import ModelRef

log = logging.getLogger(__name__)
CHUNK_ROWS = 65_536


def batch_columns(files: list[str]) -> set[str]:
    names: set[str] = set()
    for f in files:
        with batches.open_parquet(f) as pf:
            names |= set(pf.schema_arrow.names)
    return names


def downstream_check(ctx: dict[str, Any], encoder, policy) -> dict[str, Any] | None:
    """The probe's accuracy on the batch vs its test accuracy; None when it cannot be scored
    (the signal is off, the champion has no probe, or the batch carries no labels)."""
    from sae_pipeline.engine.encoder import encode_rows

    label = encoder.contract.label_column
    if not policy.downstream.enabled or not label:
        return None
    files = ctx["batch"]["files"]
    if label not in batch_columns(files):
        return None
    probe = champion.probe(ModelRef.from_dict(ctx["model"]))
    if not probe:
        return None
    features = encoder.contract.feature_columns
    classes = np.asarray(probe["classes"])
    coef, intercept = np.asarray(probe["coef"]), np.asarray(probe["intercept"])
    hits = rows = 0
    for rb in batches.iter_chunks(files, [*features, label], CHUNK_ROWS):
        x = batches.feature_matrix(rb, features)
        y = rb.column(label).to_numpy(zero_copy_only=False)
        ok, _ = batches.finite_rows(x, features)
        ok &= ~rb.column(label).is_null().to_numpy(zero_copy_only=False)
        if not ok.any():
            continue
        codes, _ = encode_rows(encoder, x[ok])  # (rows, code_dim)
        predicted = classes[(codes @ coef.T + intercept).argmax(axis=1)]
        hits += int(np.sum(predicted == y[ok].astype(classes.dtype)))
        rows += int(ok.sum())
    accuracy = hits / rows if rows else float("nan")
    result = judge(accuracy, float(probe["test_accuracy"]), rows, policy.downstream)
    log.info("downstream signal on %s: %s", ctx["batch"]["key"], result["reason"])
    return result
