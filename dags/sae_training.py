"""
### Stacked autoencoder training

Ingests and validates the data, splits it, fits the scaler on the training part, pretrains
the stacked autoencoder **one layer per task** (greedy: layer k trains on the codes of the
frozen layers below), fine-tunes it end to end, evaluates the codes with downstream probes
against raw features and PCA, registers the encoder bundle and its scaler in MLflow as
`challenger`, and promotes them to `champion` only when they pass the gate.

The number of layer tasks follows the config named by `SAE_CONFIG` (default: the digits
demo). Pretraining and fine-tuning run on the config's `heavy_queue` (`gpu` in production,
where `training.device: cuda` makes them fail at once, without retries, on a worker that
cannot use CUDA); the device each phase used is the run's `sae.device.<phase>` tag. Every
task is one call into `sae_pipeline.steps` and is safe to retry.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, chain, dag, task

from sae_pipeline.config import load_config
from sae_pipeline.steps.deployment import task_timeout

# Run parameters -> the config fields they override (None leaves the config's value).
PARAM_FIELDS = {
    "data_source": "data.source",
    "data_query": "data.query",
    "pretrain_epochs": "training.pretrain.epochs",
    "finetune_epochs": "training.finetune.epochs",
    "batch_size": "training.pretrain.batch_size",
    "learning_rate": "training.finetune.learning_rate",
    "scaler": "scaler.kind",
    "seed": "training.seed",
    "artifacts_root": "artifacts_root",
    "tracking_uri": "registry.tracking_uri",
    "encoder_model_name": "registry.encoder_model_name",
    "scaler_model_name": "registry.scaler_model_name",
}


def _params() -> dict[str, Param]:
    def optional(kind: str, doc: str) -> Param:
        return Param(None, type=["null", kind], description=doc)

    return {
        "config_path": optional("string", "YAML config; default: $SAE_CONFIG or the demo's."),
        "data_source": optional("string", "Path, URL or sklearn://<name> of the training data."),
        "data_query": optional("string", "SQL query, when data_source is a database URL."),
        "pretrain_epochs": optional("integer", "Epochs of each layer's pretraining."),
        "finetune_epochs": optional("integer", "Epochs of end-to-end fine-tuning."),
        "batch_size": optional("integer", "Mini-batch size (pretraining and fine-tuning)."),
        "learning_rate": optional("number", "Fine-tuning learning rate."),
        "scaler": Param(
            None, type=["null", "string"], enum=[None, "standard", "minmax", "robust", "none"]
        ),
        "seed": optional("integer", "Training seed."),
        "artifacts_root": optional("string", "Artifact store root (folder or fsspec URL)."),
        "tracking_uri": optional("string", "MLflow tracking URI."),
        "encoder_model_name": optional("string", "Registered model name of the encoder."),
        "scaler_model_name": optional("string", "Registered model name of the scaler."),
        "monitor_run": optional(
            "string",
            "The drift monitor run that queued this one: its review record gives the "
            "version's sae.review.* tags, and this run's end is reported back to it.",
        ),
    }


def overrides_from_params(params: dict) -> dict:
    """DAG run params as dotted config overrides; batch size applies to both phases."""
    out = {field: params.get(name) for name, field in PARAM_FIELDS.items()}
    out["training.finetune.batch_size"] = params.get("batch_size")
    return {k: v for k, v in out.items() if v is not None}


def _schedule(value: str) -> str | None:
    """A cron expression or preset; ``none`` for triggered runs only (by drift, by hand)."""
    return None if value.strip().lower() in ("", "none") else value


def mark_mlflow_run_failed(context) -> None:
    """on_failure_callback: a task failed for good, so the run's MLflow run ends FAILED."""
    ti = context["ti"]
    ctx = ti.xcom_pull(task_ids="prepare")
    if not ctx:  # prepare itself failed: no MLflow run was opened, or it cannot be found
        return
    from sae_pipeline.steps import training as steps

    reason = f"task {ti.task_id} failed: {context.get('exception')}"
    steps.mark_failed(ctx, reason)
    monitor_run = (context.get("params") or {}).get("monitor_run")
    if monitor_run:  # a retraining a reviewer approved: tell them where they look
        steps.report_to_monitor(ctx, monitor_run, False, reason)


def heavy_step(step, *args):
    """Run a heavy step (``training.device`` may require CUDA): a worker that cannot give the
    device fails the task at once, naming the cause; a retry there would fail the same way."""
    from airflow.sdk.exceptions import AirflowFailException

    from sae_pipeline.errors import DeviceError

    try:
        return step(*args)
    except DeviceError as err:
        raise AirflowFailException(str(err)) from err


def build_training_dag(config_path: str | None = None, dag_id: str = "sae_training"):
    """The training DAG for the config at ``config_path``: one task per step and per layer."""
    cfg = load_config(config_path)
    heavy_queue = os.environ.get("SAE_HEAVY_QUEUE", cfg.heavy_queue)
    n_layers = cfg.n_layers

    @dag(
        dag_id=dag_id,
        schedule=_schedule(os.environ.get("SAE_TRAINING_SCHEDULE", "@weekly")),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        params=_params(),
        doc_md=__doc__,
        tags=["sae", "training"],
        default_args={
            "retries": 2,
            "retry_delay": pendulum.duration(seconds=10),
            "execution_timeout": task_timeout(),
            "on_failure_callback": mark_mlflow_run_failed,
        },
    )
    def sae_training():
        heavy = {"queue": heavy_queue, "execution_timeout": task_timeout(heavy=True)}

        @task
        def prepare(params: dict | None = None, run_id: str | None = None) -> dict:
            from airflow.sdk.exceptions import AirflowFailException

            from sae_pipeline.errors import ConfigError, RegistryError
            from sae_pipeline.steps import training as steps

            try:
                return steps.prepare(
                    run_id,
                    params.get("config_path") or config_path,
                    overrides_from_params(params),
                    expected_layers=n_layers,
                )
            except (ConfigError, RegistryError) as err:  # a retry cannot fix either: fail now
                raise AirflowFailException(str(err)) from err

        @task
        def ingest(ctx: dict) -> dict:
            from sae_pipeline.steps import training as steps

            return steps.ingest(ctx)

        @task
        def validate(ctx: dict) -> dict:
            from airflow.sdk.exceptions import AirflowFailException

            from sae_pipeline.errors import DataError
            from sae_pipeline.steps import training as steps

            try:
                return steps.validate(ctx)
            except DataError as err:  # bad data stays bad: fail now, no retries
                raise AirflowFailException(str(err)) from err

        @task
        def split(ctx: dict) -> dict:
            from sae_pipeline.steps import training as steps

            return steps.split(ctx)

        @task
        def fit_scaler(ctx: dict) -> dict:
            from sae_pipeline.steps import training as steps

            return steps.fit_scaler(ctx)

        @task(**heavy)
        def try_candidate(ctx: dict, candidate: dict) -> dict:
            from sae_pipeline.steps import training as steps

            return heavy_step(steps.try_candidate, ctx, candidate)

        @task
        def select_candidate(ctx: dict, results: list[dict]) -> dict:
            from sae_pipeline.steps import training as steps

            return steps.select_candidate(ctx, list(results))

        @task(**heavy)
        def pretrain_layer(ctx: dict, layer: int) -> dict:
            from sae_pipeline.steps import training as steps

            return heavy_step(steps.pretrain_layer, ctx, layer)

        @task(**heavy)
        def finetune(ctx: dict) -> dict:
            from sae_pipeline.steps import training as steps

            return heavy_step(steps.finetune, ctx)

        @task
        def evaluate(ctx: dict) -> dict:
            from sae_pipeline.steps import training as steps

            return steps.evaluate(ctx)

        @task
        def register(ctx: dict, params: dict | None = None) -> dict:
            from sae_pipeline.steps import training as steps

            return steps.register(ctx, monitor_run=params.get("monitor_run"))

        @task
        def promote(ctx: dict, registered: dict, params: dict | None = None) -> dict:
            from sae_pipeline.steps import training as steps

            result = steps.promote(ctx, registered)
            if params.get("monitor_run"):
                gate = "promoted" if result["promoted"] else "not promoted"
                done = f"v{registered['encoder_version']} {gate}: {result['reason']}"
                steps.report_to_monitor(ctx, params["monitor_run"], True, done)
            return result

        ctx = prepare()
        scaled = fit_scaler(ctx)
        chain(ingest(ctx), validate(ctx), split(ctx), scaled)
        train_ctx = ctx
        if cfg.selection.candidates:
            # One mapped task per candidate; the winner's config is what the layers train.
            scores = try_candidate.partial(ctx=ctx).expand(candidate=cfg.selection.candidates)
            scaled >> scores
            train_ctx = select_candidate(ctx, scores)
        layers = [
            pretrain_layer.override(task_id=f"pretrain_layer_{k}")(train_ctx, k)
            for k in range(1, n_layers + 1)
        ]
        registered = register(train_ctx)
        chain(scaled, *layers, finetune(train_ctx), evaluate(train_ctx), registered)
        promote(train_ctx, registered)

    return sae_training()


training_dag = build_training_dag(os.environ.get("SAE_CONFIG"))
