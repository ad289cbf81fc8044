"""
### Drift monitor: batch vs the champion's training reference, and retraining

Compares a batch with the champion's training reference on three signals with Evidently:
the **raw features**, the **latent codes** and the **reconstruction error**. Each report is
saved as HTML and JSON under `<root>/monitoring/checks/<run>/` and logged to MLflow (experiment
`sae-monitoring`), with a summary a reviewer reads first (the run's description): batch, model
version, drift share per signal, decision and reason.

- **When**: daily (`$SAE_DRIFT_SCHEDULE`, cron) and whenever a batch is announced on the
  `sae_new_batches` Asset. A scheduled run checks the latest announced batch (only the newest
  event is read); the `batch` param overrides both. A batch another run already acted on
  against the same champion version is not judged again: the run returns the earlier
  decision and triggers nothing (`<root>/monitoring/decisions/<model>/v<version>/...`).
- **Policy** (`$SAE_DRIFT_POLICY` YAML, or params): drift share threshold, per-signal
  thresholds, minimum batch size, sample size, retraining on or off. Under `$SAE_DRIFT_POLICY`
  the judging fields (drift shares, signals, rows) are the deployment's: a param or
  `policy_path` that changes one fails the run at `prepare`, naming the field.
- **Retraining data**: when retraining may follow, `retraining_data` writes the champion's
  training snapshot plus the batch's valid rows to the store (a batch row supersedes the
  champion's row with the same id) and checks it, before anyone is asked.
- **Review** (the deployment policy's `review`; the `review` param can only raise it to
  `required`): under `required`, a drift decision waits at the `review` task (Airflow's
  *Required actions*, or `PATCH .../hitlDetails`) for a person to choose **retrain**,
  **accept** (the batch becomes the new normal) or **dismiss**; the body is the check's
  summary with links to the reports and the MLflow run. No answer within `timeout_hours`
  takes the policy's `default`. `record_review` records the decision (once per batch and
  version, under a lock) and tags the choice on the check's MLflow run. Under `auto` (the
  default) the task passes straight through.
- **Retraining**: `trigger_retraining` *queues* a `sae_training` run with
  `conf={"data_source": <that file>, "monitor_run": <this run>, ...}`; the scheduler starts
  it. That run registers a `challenger` (with the review's `sae.review.*` tags, read from
  this run's record), which becomes `champion` only if it passes the gate; its end (success
  or failure) is written back to this run's record and MLflow run. Without drift both tasks
  are skipped.
"""

from __future__ import annotations

import datetime
import os

import pendulum
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from sae_pipeline.steps.deployment import task_timeout

NEW_BATCHES = Asset(
    name="sae_new_batches", uri=os.environ.get("SAE_NEW_BATCHES_URI", "sae://batches/new")
)
SCHEDULE = AssetOrTimeSchedule(
    timetable=CronTriggerTimetable(
        os.environ.get("SAE_DRIFT_SCHEDULE", "0 6 * * *"), timezone="UTC"
    ),
    assets=[NEW_BATCHES],
)


def _optional(kind: str, doc: str) -> Param:
    return Param(None, type=["null", kind], description=doc)


class DriftReview(HITLOperator):
    """A person's choice on a drift decision; passes straight through when none is needed.

    What to ask (subject, body, default, timeout) is known only after the check, so it is read
    from the `review_request` task's result at run time.
    """

    def execute(self, context):
        req = context["ti"].xcom_pull(task_ids="review_request")
        if not req or not req["required"]:
            return {}
        self.subject, self.body = req["subject"], req["body"]
        self.defaults = [req["default"]]
        # A plain timedelta: the task runner serializes it when it parks the task.
        self.response_timeout = datetime.timedelta(seconds=req["timeout_s"])
        return super().execute(context)

    def execute_complete(self, context, event):
        answer = super().execute_complete(context, event)
        return {**answer, "responded_at": answer["responded_at"].isoformat()}


@dag(
    dag_id="sae_drift_monitor",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "batch": Param(
            None,
            type=["null", "string", "array"],
            description="Parquet file, folder or list; default: the Asset event's or the latest.",
        ),
        "model_version": _optional("string", "Encoder version; default: the champion's."),
        "policy_path": _optional("string", "Drift policy YAML; default: $SAE_DRIFT_POLICY."),
        "drift_share": _optional("number", "Share of drifted columns that means drift."),
        "signal_thresholds": Param(
            None,
            type=["null", "object"],
            description='Per-signal drift share, e.g. {"reconstruction_error": 1.0}.',
        ),
        "min_rows": _optional("integer", "Fewer valid rows: reported, not judged."),
        "sample_rows": _optional("integer", "Rows the tests see (0 = all)."),
        "retrain": Param(None, type=["null", "boolean"], description="Retrain on drift."),
        "review": Param(
            None,
            type=["null", "string"],
            enum=[None, "auto", "required"],
            description="required: drift decisions wait for a person; auto cannot lower the "
            "deployment policy's review.",
        ),
        "monitoring_experiment": _optional("string", "MLflow experiment of the checks."),
        "config_path": _optional("string", "YAML config; default: $SAE_CONFIG or the demo's."),
        "artifacts_root": _optional("string", "Artifact store root (folder or fsspec URL)."),
        "tracking_uri": _optional("string", "MLflow tracking URI."),
        "encoder_model_name": _optional("string", "Registered model name of the encoder."),
        "scaler_model_name": _optional("string", "Registered model name of the scaler."),
    },
    doc_md=__doc__,
    tags=["sae", "monitoring"],
    default_args={
        "retries": 2,
        "retry_delay": pendulum.duration(seconds=10),
        "execution_timeout": task_timeout(),
    },
)
def sae_drift_monitor():
    @task(inlets=[NEW_BATCHES])
    def prepare(params=None, run_id=None, triggering_asset_events=None, inlet_events=None):
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from sae_pipeline.data import batches
        from sae_pipeline.errors import ConfigError, DataError
        from sae_pipeline.steps import monitoring

        try:
            # Only the newest event: reading them all grows with every batch ever announced.
            events = inlet_events[NEW_BATCHES]
            latest = None if params.get("batch") else events.ascending(False).limit(1)
            return monitoring.context(run_id, params, triggering_asset_events, latest)
        except batches.NoBatch as err:  # a scheduled run before any batch was announced
            raise AirflowSkipException(str(err)) from None
        except (ConfigError, DataError) as err:  # a bad batch or setting stays bad: no retries
            raise AirflowFailException(str(err)) from err

    @task
    def reference(ctx: dict) -> dict:
        from sae_pipeline.steps import monitoring

        return monitoring.reference(ctx)

    @task
    def check(ctx: dict, ref: dict) -> dict:
        """The decision: reports, MLflow run, and `retrain_triggered`."""
        from sae_pipeline.steps import monitoring

        return monitoring.check(ctx, ref)

    @task
    def retraining_data(ctx: dict, summary: dict) -> dict:
        """The retraining data, written and checked before anyone is asked to approve it."""
        from airflow.sdk.exceptions import AirflowFailException

        from sae_pipeline.errors import DataError
        from sae_pipeline.steps import monitoring

        try:
            return monitoring.prepare_data(ctx, summary)
        except DataError as err:  # the batch stays unusable: no retries
            raise AirflowFailException(str(err)) from err

    @task
    def review_request(ctx: dict, summary: dict) -> dict:
        """What the reviewer is asked, or that the policy decides alone."""
        from sae_pipeline.steps import review

        return review.request(ctx, summary)

    @task
    def record_review(ctx: dict, summary: dict, answer: dict | None) -> dict:
        """The choice, who made it and when: on the MLflow run and in the store."""
        from sae_pipeline.steps import review

        return review.record(ctx, summary, answer)

    @task.short_circuit
    def retraining_conf(ctx: dict, summary: dict) -> dict | None:
        """The training conf (new data included) when retraining is due; else skip."""
        from sae_pipeline.steps import monitoring

        return monitoring.training_conf(ctx, summary)

    ctx = prepare()
    summary = retraining_data(ctx, check(ctx, reference(ctx)))
    answer = DriftReview(
        task_id="review",
        subject="Drift review",
        options=["retrain", "accept", "dismiss"],
        defaults="dismiss",
        response_timeout=datetime.timedelta(hours=24),
        execution_timeout=None,
        retries=0,
    )
    review_request(ctx, summary) >> answer
    conf = retraining_conf(ctx, record_review(ctx, summary, answer.output))
    # Queues the run; a scheduler starts it. Keyed by this run, so a retry never queues two.
    TriggerDagRunOperator(
        task_id="trigger_retraining",
        trigger_dag_id="sae_training",
        trigger_run_id="drift__{{ run_id }}",
        conf=conf,
        skip_when_already_exists=True,
    )


drift_dag = sae_drift_monitor()
