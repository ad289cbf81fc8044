"""The drift monitor's memory: which run acted on (batch, champion version), and how.

One JSON file per decision, created once, when the decision is acted on (after the review, if
the policy asks for one; ``claim``)::

    <root>/monitoring/decisions/<model>/v<version>/<batch key>-p<judge hash>.json

holding ``{"run_key", "tracking_uri", "summary"}`` (the summary carries the review) and, once
a retraining queued by it has ended, ``retraining`` (``report_retraining``). The key is the
batch, the champion version and the policy fields that judge drift (``JUDGE_FIELDS``), nothing
else: a run under another review mode, experiment or timeout is a repeat, not a new judgement. The
file is created under a lock, so of two runs that act on one batch (a DAG run and
``sae-pipeline drift --retrain``) exactly one does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from typing import Any

from sae_pipeline import storage
from sae_pipeline.registry.champion import ModelRef

log = logging.getLogger(__name__)

# The policy fields that decide whether a batch drifted: the decision's key.
JUDGE_FIELDS = ("drift_share", "signals", "min_rows", "sample_rows", "downstream", "seed")
RETRAINING_DATA = "training_data.parquet"


def judge_hash(policy: dict[str, Any] | None) -> str:
    """A short hash of the policy's ``JUDGE_FIELDS`` (review, experiment and retrain left out)."""
    fields = {k: (policy or {}).get(k) for k in JUDGE_FIELDS}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _uri(root: str, name: str, version: str, batch_key: str, policy: dict[str, Any] | None) -> str:
    return storage.join(
        root, "monitoring", "decisions", name, f"v{version}",
        f"{storage.run_key(batch_key)}-p{judge_hash(policy)}.json",
    )  # fmt: skip


def decision_uri(ctx: dict[str, Any]) -> str:
    """Where the decision on (this batch, this model version) is kept, whichever run made it."""
    ref = ModelRef.from_dict(ctx["model"])
    return _uri(ctx["artifacts_root"], ref.name, ref.version, ctx["batch"]["key"], ctx["policy"])


def retraining_data_uri(root: str, run_key: str) -> str:
    """The retraining data a monitor run writes (champion snapshot + batch)."""
    return storage.join(root, "retraining", run_key, RETRAINING_DATA)


def _already(earlier: dict[str, Any]) -> dict[str, Any]:
    return {
        **earlier["summary"],
        "retrain_triggered": False,
        "already_decided_by": earlier["run_key"],
        "reason": f"already decided by run {earlier['run_key']}: {earlier['summary']['reason']}",
    }


def earlier_decision(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The decision another run acted on for this batch and version: returned, nothing triggered.

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
    log.info("batch %s was decided by run %s", ctx["batch"]["key"], earlier["run_key"])
    return _already(earlier)


def claim(ctx: dict[str, Any], summary: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Record that this run acts on ``summary``, unless another run already did.

    Check and write happen under one lock (``storage.lock``: ``flock`` on a local store), so
    two runs racing on one batch cannot both act. Returns (True, summary) for the run that
    holds the record (a retry of it included), else (False, the earlier decision, with
    nothing triggered).
    """
    uri = decision_uri(ctx)
    with storage.lock(uri + ".lock"):
        if storage.exists(uri):
            held = storage.read_json(uri)
            if held["run_key"] != ctx["run_key"]:
                return False, _already(held)
            return True, held["summary"]
        record = {"run_key": ctx["run_key"], "tracking_uri": ctx["tracking_uri"]}
        storage.write_json(uri, {**record, "summary": summary})
    return True, summary


def _monitor_record(root: str, monitor_run: str) -> tuple[str, dict[str, Any]] | None:
    """The decision record a monitor run holds, found from its check's summary; or None."""
    key = storage.run_key(monitor_run)
    summary_uri = storage.join(root, "monitoring", "checks", key, "summary.json")
    if not storage.exists(summary_uri):
        return None
    s = storage.read_json(summary_uri)
    uri = _uri(root, s["model_name"], s["model_version"], s["batch_key"], s["policy"])
    if not storage.exists(uri):
        return None
    record = storage.read_json(uri)
    return (uri, record) if record.get("run_key") == key else None


def review_tags_for(root: str, monitor_run: str | None, data_source: str) -> dict[str, str]:
    """The ``sae.review.*`` tags of a retraining queued by ``monitor_run``; {} when none hold.

    Read from the monitor's own decision record, never from what the trigger says: the record
    must exist, be that run's, say ``retrain``, and the retraining must train on the data that
    run wrote. Anything else gets no review tags.
    """
    from sae_pipeline.monitoring.review import review_tags

    if not monitor_run:
        return {}
    found = _monitor_record(root, monitor_run)
    if found is None:
        log.warning("no decision record of monitor run %s: no review tags", monitor_run)
        return {}
    review = found[1]["summary"].get("review") or {}
    expected = retraining_data_uri(root, storage.run_key(monitor_run))
    same_data = storage.normalize_root(data_source) == storage.normalize_root(expected)
    if review.get("choice") != "retrain" or not same_data:
        log.warning("monitor run %s did not approve training on %s", monitor_run, data_source)
        return {}
    return review_tags(review)


def report_retraining(
    root: str, monitor_run: str, training_run: str, ok: bool, detail: str = ""
) -> dict[str, Any] | None:
    """Write a retraining's end into the monitor run's decision record and its MLflow run.

    Where a reviewer looks after approving: the record gets ``retraining`` (state, run, detail,
    when); the check's MLflow run gets ``sae.retraining.*`` tags. None when the monitor run
    has no record (a retraining nobody's decision queued).
    """
    found = _monitor_record(root, monitor_run)
    if found is None:
        return None
    uri, record = found
    state = "succeeded" if ok else "failed"
    outcome = {
        "state": state,
        "training_run": training_run,
        "detail": detail.splitlines()[0][:1000] if detail else "",
        "at": dt.datetime.now(dt.UTC).isoformat(),
    }
    with storage.lock(uri + ".lock"):
        storage.write_json(uri, {**storage.read_json(uri), "retraining": outcome})
    run_id, tracking_uri = record["summary"].get("mlflow_run_id"), record.get("tracking_uri")
    if run_id and tracking_uri:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        tags = {
            "sae.retraining.state": state,
            "sae.retraining.run": training_run,
            "sae.retraining.detail": outcome["detail"] or state,
        }
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
    log.log(
        logging.INFO if ok else logging.ERROR,
        "retraining %s for monitor run %s %s %s",
        training_run,
        monitor_run,
        state,
        outcome["detail"],
    )
    return outcome
