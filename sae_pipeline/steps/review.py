"""The drift monitor's review step: what the reviewer is asked, and recording what they chose.

``request`` says whether the check's decision waits for a person (the policy's ``review``
section) and, if so, gives the review's subject and body; the DAG's review task shows them in
Airflow's UI and REST API. ``record`` writes the answer down, whoever gave it (a person, the
timeout's default, or the policy itself under ``review: auto``):

- tags ``sae.review.choice``, ``sae.review.by``, ``sae.review.at`` on the check's MLflow run
  (and, through the training conf, on the retrained model version);
- the decision file of (batch, champion version), so the same batch is not judged again;
- for ``accept``, ``<root>/monitoring/accepted/<model>/v<version>/<batch key>.json``: the batch
  joins that version's drift reference (``accepted_batches``).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any
from urllib.parse import quote

from sae_pipeline import storage
from sae_pipeline.monitoring import review
from sae_pipeline.monitoring.drift import DriftPolicy
from sae_pipeline.registry.champion import ModelRef
from sae_pipeline.steps._drift_decisions import decision_uri

log = logging.getLogger(__name__)

TIMEOUT_REVIEWER = "timeout (the policy's default)"


def _policy(ctx: dict[str, Any]) -> review.ReviewPolicy:
    return DriftPolicy.model_validate(ctx["policy"]).review


def report_links(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, str]:
    """Links a reviewer follows: each Evidently report in the store and in MLflow, the run."""
    links: dict[str, str] = {}
    out = summary.get("report_dir")
    signals = list(summary.get("drift_share", {})) or list(summary.get("signals", {}))
    for name in signals:
        if out:
            path = storage.join(out, f"{name}.html")
            links[f"{name} report"] = (
                storage.local_path(path).as_uri() if storage.is_local(path) else path
            )
    run_id, uri = summary.get("mlflow_run_id"), ctx.get("tracking_uri") or ""
    if run_id and uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        for name in signals:
            links[f"{name} report (MLflow)"] = (
                f"{base}/get-artifact?path={quote(f'drift/{name}.html')}&run_uuid={run_id}"
            )
        links["MLflow run"] = f"{base}/#/runs/{run_id}"
    elif run_id:
        links["MLflow run"] = f"runs:/{run_id}"
    return links


def request(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The review to ask for, or ``{"required": False}`` when the policy acts by itself.

    A batch another run already decided is never reviewed again.
    """
    policy = _policy(ctx)
    if summary.get("already_decided_by") or not policy.required(summary.get("decision", "")):
        return {"required": False}
    full = storage.read_json(storage.join(summary["report_dir"], "summary.json"))
    return {
        "required": True,
        "subject": review.review_subject(summary),
        "body": review.review_body(full, report_links(ctx, summary)),
        "options": list(review.CHOICES),
        "default": policy.default,
        "timeout_s": policy.timeout_hours * 3600,
    }


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return str(value) if value else dt.datetime.now(dt.UTC).isoformat()


def record(
    ctx: dict[str, Any], summary: dict[str, Any], answer: dict[str, Any] | None
) -> dict[str, Any]:
    """The summary after the review, with the choice recorded in MLflow and the store.

    ``answer`` is the review task's result: ``chosen_options``, ``responded_by_user`` (None
    when the timeout chose) and ``responded_at``; None or ``{}`` when no review was asked for.
    """
    if answer and answer.get("chosen_options"):
        choice = answer["chosen_options"][0]
        user = answer.get("responded_by_user") or {}
        by = user.get("name") or user.get("id") or TIMEOUT_REVIEWER
        at = _when(answer.get("responded_at"))
    else:  # review: auto, or a batch already decided: the check's own decision stands
        choice = "retrain" if summary.get("retrain_triggered") else None
        by, at = review.AUTO_REVIEWER, _when(None)
    result = review.outcome(summary, choice, by, at)
    if summary.get("already_decided_by"):
        return result
    tags = review.review_tags(result["review"])
    if tags and summary.get("mlflow_run_id"):
        from mlflow import MlflowClient

        uri = ctx["tracking_uri"]
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for key, value in tags.items():
            client.set_tag(summary["mlflow_run_id"], key, value)
    if choice == "accept":
        storage.write_json(
            accepted_uri(ctx, ctx["batch"]["key"]),
            {"batch": ctx["batch"], "run_key": ctx["run_key"], "by": by, "at": at},
        )
    storage.write_json(decision_uri(ctx), {"run_key": ctx["run_key"], "summary": result})
    log.info("review of %s: %s by %s at %s", ctx["run_key"], choice, by, at)
    return result


def accepted_uri(ctx: dict[str, Any], batch_key: str) -> str:
    ref = ModelRef.from_dict(ctx["model"])
    return storage.join(
        ctx["artifacts_root"], "monitoring", "accepted", ref.name, f"v{ref.version}",
        f"{storage.run_key(batch_key)}.json",
    )  # fmt: skip


def accepted_batches(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The batches reviewers accepted as normal for the pinned champion version, by key."""
    folder = storage.join(ctx["artifacts_root"], "monitoring", "accepted")
    ref = ModelRef.from_dict(ctx["model"])
    folder = storage.join(folder, ref.name, f"v{ref.version}")
    if not storage.exists(folder):
        return []
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    files = fs.glob(path.rstrip("/") + "/*.json")
    local = storage.is_local(folder)
    found = [storage.read_json(f if local else fs.unstrip_protocol(f))["batch"] for f in files]
    return sorted(found, key=lambda b: b["key"])
