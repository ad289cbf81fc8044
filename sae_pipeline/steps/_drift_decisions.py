"""The drift monitor's memory: which run decided what on (batch, champion version).

One JSON file per decision, written atomically after the check's summary::

    <root>/monitoring/decisions/<model>/v<version>/<batch key>-p<policy hash>.json

holding ``{"run_key", "summary"}``. The policy is part of the key: a check under another policy
(other thresholds, another test) is another judgement, not a repeat.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from sae_pipeline import storage
from sae_pipeline.registry.champion import ModelRef

log = logging.getLogger(__name__)


def decision_uri(ctx: dict[str, Any]) -> str:
    """Where the decision on (this batch, this model version) is kept, whichever run made it."""
    ref = ModelRef.from_dict(ctx["model"])
    policy = json.dumps(ctx.get("policy") or {}, sort_keys=True, default=str)
    tag = hashlib.sha256(policy.encode()).hexdigest()[:10]
    return storage.join(
        ctx["artifacts_root"], "monitoring", "decisions", ref.name, f"v{ref.version}",
        f"{storage.run_key(ctx['batch']['key'])}-p{tag}.json",
    )  # fmt: skip


def earlier_decision(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The decision another run made on this batch and version: returned, nothing triggered.

    A daily run sees the same latest batch until a new one is announced; while the champion is
    unchanged (retraining queued, running, or its challenger rejected), judging it again would
    queue one more retraining on the same data each day.
    """
    uri = decision_uri(ctx)
    if not storage.exists(uri):
        return None
    earlier = storage.read_json(uri)
    if earlier["run_key"] == ctx["run_key"]:
        return None  # this run's own decision: its summary answers (a retry)
    log.info(
        "batch %s on %s was decided by run %s: %s",
        ctx["batch"]["key"],
        decision_uri(ctx),
        earlier["run_key"],
        earlier["summary"].get("decision"),
    )
    return {
        **earlier["summary"],
        "retrain_triggered": False,
        "already_decided_by": earlier["run_key"],
        "reason": f"already decided by run {earlier['run_key']}: {earlier['summary']['reason']}",
    }
