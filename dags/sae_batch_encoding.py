"""
### Batch encoding with the champion

Encodes a batch of new rows with the encoder behind `models:/<encoder>@champion`: raw
features in, one row out per accepted row with its `row` number, its id (when the data
contract has one), the codes `code_0..` and the `reconstruction_error` (an anomaly score).

- **Input**: the `batch` param (a Parquet file, a folder of them, or a list; a path or an
  fsspec URL), or an event on the `sae_new_batches` Asset whose extra holds `{"path": ...}`.
- **Contract**: `prepare` pins the champion version for the whole run and checks the batch's
  schema and first rows against that version's data contract; a missing or non-numeric
  feature column fails the run before anything is written.
- **Shards**: the batch is cut into shards of whole Parquet row groups (`shard_rows`), encoded
  in parallel by dynamic task mapping on CPU workers, each streamed in `chunk_rows` chunks
  (memory stays flat). Rows with a missing, NaN or infinite feature go to `_quarantine/`.
- **Output**: published at once by `commit` (rows in = rows encoded + rows quarantined is
  checked), then announced on the `sae_encoded_batches` Asset (extra: path, model version,
  row counts). Re-running a batch already encoded by that version does nothing.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Asset, Param, dag, task

from sae_pipeline.steps.deployment import task_timeout

NEW_BATCHES = Asset(
    name="sae_new_batches", uri=os.environ.get("SAE_NEW_BATCHES_URI", "sae://batches/new")
)
ENCODED_BATCHES = Asset(
    name="sae_encoded_batches",
    uri=os.environ.get("SAE_ENCODED_BATCHES_URI", "sae://batches/encoded"),
)


def _optional(kind: str, doc: str) -> Param:
    return Param(None, type=["null", kind], description=doc)


@dag(
    dag_id="sae_batch_encoding",
    schedule=[NEW_BATCHES],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "batch": Param(
            None,
            type=["null", "string", "array"],
            description="Parquet file, folder or list (path or URL); default: the Asset event's.",
        ),
        "output": _optional(
            "string", "Output folder; default: <root>/encodings/<model>/v<n>/<batch>."
        ),
        "model_version": _optional("string", "Encoder version; default: the champion's."),
        "chunk_rows": _optional("integer", "Rows per streamed chunk (default 65536)."),
        "shard_rows": _optional("integer", "Rows per parallel shard (default 1,000,000)."),
        "config_path": _optional("string", "YAML config; default: $SAE_CONFIG or the demo's."),
        "artifacts_root": _optional("string", "Artifact store root (folder or fsspec URL)."),
        "tracking_uri": _optional("string", "MLflow tracking URI."),
        "encoder_model_name": _optional("string", "Registered model name of the encoder."),
    },
    doc_md=__doc__,
    tags=["sae", "encoding"],
    default_args={
        "retries": 2,
        "retry_delay": pendulum.duration(seconds=10),
        "execution_timeout": task_timeout(),
    },
)
def sae_batch_encoding():
    @task
    def prepare(params=None, run_id=None, triggering_asset_events=None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from sae_pipeline.errors import ConfigError, DataError
        from sae_pipeline.steps import encoding

        try:
            return encoding.context(run_id, params, triggering_asset_events)
        except (ConfigError, DataError) as err:  # bad params or a bad batch stay so: no retries
            raise AirflowFailException(str(err)) from err

    @task
    def plan(ctx: dict) -> list[dict]:
        from sae_pipeline.steps import encoding

        return encoding.plan_step(ctx)

    # On the CPU workers' queue, not the heavy one: Parquet and numpy work, 4 shards per CPU
    # worker against 1 per GPU (steps/encoding.py: ENCODE_DEVICE).
    @task(execution_timeout=task_timeout(heavy=True))
    def encode_shard(ctx: dict, shard: dict) -> dict:
        from sae_pipeline.steps import encoding

        return encoding.encode_shard_step(ctx, shard)

    # none_failed: a batch already encoded plans no shards, and commit returns its manifest.
    @task(outlets=[ENCODED_BATCHES], trigger_rule="none_failed")
    def commit(ctx: dict, results, outlet_events=None) -> dict:
        from sae_pipeline.steps import encoding

        manifest = encoding.commit_step(ctx, results or [])
        outlet_events[ENCODED_BATCHES].extra = encoding.asset_extra(manifest)
        return manifest

    ctx = prepare()
    commit(ctx, encode_shard.partial(ctx=ctx).expand(shard=plan(ctx)))


encoding_dag = sae_batch_encoding()
