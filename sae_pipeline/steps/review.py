"""The drift monitor's review step: what the reviewer is asked, and recording what they chose.

``request`` says whether the check's decision waits for a person (the policy's ``review``
section) and, if so, gives the review's subject and body; the DAG's review task shows them in
Airflow's UI and REST API. ``record`` writes the answer down, whoever gave it (a person, the
timeout's default, or the policy itself under ``review: auto``):

- the decision record of (batch, champion version), created once under a lock
  (``_drift_decisions.claim``): of two runs on one batch only the first acts, and the same
  batch is not judged again. The retrained version's ``sae.review.*`` tags are read from
  this record, never from the training run's conf;
- tags ``sae.review.choice``, ``sae.review.by``, ``sae.review.at`` on the check's MLflow run;
- for ``accept``, ``<root>/monitoring/accepted/<model>/v<version>/<batch key>.json``: the batch
  joins that version's drift reference (``accepted_batches``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any
from urllib.parse import quote

from sae_pipeline import storage
from sae_pipeline.monitoring import review
from sae_pipeline.monitoring.drift import DriftPolicy
from sae_pipeline.registry.champion import ModelRef
from sae_pipeline.steps._drift_decisions import claim

log = logging.getLogger(__name__)

TIMEOUT_REVIEWER = "timeout (the policy's default)"


def _policy(ctx: dict[str, Any]) -> review.ReviewPolicy:
    return DriftPolicy.model_validate(ctx["policy"]).review


MLFLOW_PUBLIC_URL = "SAE_MLFLOW_PUBLIC_URL"  # MLflow as a reviewer's browser reaches it
ARTIFACTS_PUBLIC_URL = "SAE_ARTIFACTS_PUBLIC_URL"  # the artifact root, served over http(s)


def _http(value: str | None) -> str | None:
    """``value`` without its trailing slash when it is an http(s) URL, else None."""
    value = (value or "").strip()
    return value.rstrip("/") if value.startswith(("http://", "https://")) else None


def report_links(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, str]:
    """http(s) links a reviewer's browser can follow: each report, in the store and in MLflow.

    Built from the public URLs (``$SAE_MLFLOW_PUBLIC_URL``, else an http(s) tracking URI;
    ``$SAE_ARTIFACTS_PUBLIC_URL`` for the artifact root), never ``file://`` or ``runs:/``
    (Airflow's page drops those, and a reviewer's browser cannot open a worker's files). What
    has no public URL is named in ``unlinked``.
    """
    links: dict[str, str] = {}
    out, root = summary.get("report_dir") or "", ctx["artifacts_root"].rstrip("/")
    signals = list(summary.get("drift_share", {})) or list(summary.get("signals", {}))
    store = _http(os.environ.get(ARTIFACTS_PUBLIC_URL))
    if store and out.startswith(root + "/"):
        folder = quote(out[len(root) + 1 :])
        for name in signals:
            links[f"{name} report"] = f"{store}/{folder}/{name}.html"
    run_id = summary.get("mlflow_run_id")
    base = _http(os.environ.get(MLFLOW_PUBLIC_URL)) or _http(ctx.get("tracking_uri"))
    if run_id and base:
        for name in signals:
            links[f"{name} report (MLflow)"] = (
                f"{base}/get-artifact?path={quote(f'drift/{name}.html')}&run_uuid={run_id}"
            )
        links["MLflow run"] = f"{base}/#/runs/{run_id}"
    return links


def unlinked(ctx: dict[str, Any], summary: dict[str, Any], links: dict[str, str]) -> list[str]:
    """Where the reports are when no public URL links them (text, not links)."""
    lines = []
    if summary.get("report_dir") and not any(k.endswith(" report") for k in links):
        lines.append(
            f"reports in the artifact store: `{summary['report_dir']}` (no public URL: set "
            f"{ARTIFACTS_PUBLIC_URL})"
        )
    if summary.get("mlflow_run_id") and "MLflow run" not in links:
        lines.append(
            f"MLflow run `{summary['mlflow_run_id']}` (no public URL: set {MLFLOW_PUBLIC_URL})"
        )
    return lines


def request(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The review to ask for, or ``{"required": False}`` when the policy acts by itself.

    A batch another run already decided is never reviewed again.
    """
    policy = _policy(ctx)
    if summary.get("already_decided_by") or not policy.required(summary.get("decision", "")):
        return {"required": False}
    full = storage.read_json(storage.join(summary["report_dir"], "summary.json"))
    links = report_links(ctx, summary)
    notes = unlinked(ctx, summary, links)
    if summary.get("retraining_data"):
        notes.insert(0, review.retraining_note(summary["retraining_data"]))
    return {
        "required": True,
        "subject": review.review_subject(summary),
        "body": review.review_body(full, links, notes),
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
    held, result = claim(ctx, result)  # the decision is recorded now, when it is acted on
    if not held:  # another run (the CLI's `drift --retrain`, another DAG run) acted first
        log.info("batch %s: %s", ctx["batch"]["key"], result["reason"])
        return result
    choice, by, at = (result["review"][k] for k in ("choice", "by", "at"))
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


def act_here(ctx: dict[str, Any], summary: dict[str, Any], retrain_run: str | None) -> dict:
    """What the CLI's ``drift`` does after the check, and says it did and did not do.

    Without ``retrain_run`` (no ``--retrain``) nothing is recorded: a later run (the DAG, or
    ``drift --retrain``) may still act on the batch. With it, the decision is recorded (once
    per batch and version, as the DAG's ``record_review`` does) and a retraining runs here;
    never when the policy wants a person's review of the decision, which only the DAG asks.
    """
    from sae_pipeline.steps import _retraining

    due = bool(summary.get("retrain_triggered"))
    done = [f"checked batch {summary['batch_key']}: reports in {summary.get('report_dir')}"]
    if summary.get("already_decided_by"):
        return {
            "check": summary,
            "did": done,
            "did_not": [f"act: run {summary['already_decided_by']} already acted on this batch"],
        }
    if retrain_run is None:
        not_done = ["record a decision: a later run may still act on this batch"]
        if due:
            not_done.append("retrain: the check asks for it; run again with --retrain")
        return {
            "check": {**summary, "retrain_triggered": False, "retrain_due": due},
            "did": done,
            "did_not": not_done,
        }
    if _policy(ctx).required(summary.get("decision", "")):
        return {
            "check": {**summary, "retrain_triggered": False, "retrain_due": due},
            "did": done,
            "did_not": [
                "record a decision or retrain: the drift policy wants a person's review of "
                f"{summary['decision']!r}; the sae_drift_monitor DAG asks for it"
            ],
        }
    checked = _retraining.prepare_data(ctx, summary)
    result = record(ctx, checked, None)
    if result.get("already_decided_by"):
        return {"check": result, "did": done, "did_not": [f"act: {result['reason']}"]}
    done.append(f"recorded the decision {result['decision']!r}")
    if not result["retrain_triggered"]:
        return {"check": result, "did": done, "did_not": ["retrain: not asked for"]}
    retraining = _retraining.retrain(ctx, result, retrain_run)
    done.append(f"retrained as run {retrain_run}")
    return {"check": result, "did": done, "did_not": [], "retraining": retraining}
