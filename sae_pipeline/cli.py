"""``sae-pipeline``: the same steps the DAGs run, from a shell.

Errors the user can fix (bad config, bad data, registry state) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _set_overrides(items: Sequence[str]) -> dict:
    """``--set a.b=value`` pairs; values are parsed as YAML (numbers, lists, booleans)."""
    import yaml

    from sae_pipeline.errors import ConfigError

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
        if out[key.strip()] is None:  # overrides of None mean "leave it" (unset DAG params)
            raise ConfigError(
                f"override {item!r}: null would leave {key} as it is; "
                "write it as null in the YAML config (or policy) instead"
            )
    return out


def _config_path(path: str | None, what: str = "--config") -> str | None:
    """A YAML file a flag names, checked as the DAGs' ``config_path`` param is."""
    from sae_pipeline.steps.deployment import check_config_path

    return check_config_path(path, what)


def cmd_demo(args: argparse.Namespace) -> int:
    from sae_pipeline.demo.demo import run_demo

    run_demo(
        Path(args.workdir).resolve(),
        conf=json.loads(args.conf) if args.conf else None,
        loop=not args.no_loop,
    )
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    from sae_pipeline.demo.standalone import run_local_airflow

    return run_local_airflow(
        Path(args.workdir).resolve(), args.port, args.config, args.policy, args.timeout
    )


def cmd_train(args: argparse.Namespace) -> int:
    from sae_pipeline.steps.training import run_training

    if args.resume and args.run_id:
        from sae_pipeline.errors import ConfigError

        raise ConfigError("--resume names the run to continue; leave out --run-id")
    run_id = args.resume or _cli_run_id(args.run_id, "train")
    result = run_training(run_id, args.config, _set_overrides(args.set), resume=bool(args.resume))
    shown = ("validate", "evaluate", "register", "promote")  # validate: the row counts
    ctx = result["context"]
    out = {"run_id": run_id, **{k: result[k] for k in shown}}
    out["artifacts"] = ctx["run_dir"]
    out["tracking_uri"] = ctx["tracking_uri"]
    print(json.dumps(out, indent=2))
    # Another process (mlflow.pyfunc.load_model, mlflow models serve, mlflow ui) finds the
    # registry only through this variable; without it MLflow opens ./mlflow.db, which is empty.
    print(
        f"\nThe models are registered in {ctx['tracking_uri']}; to use them from another "
        f"process:\n  export MLFLOW_TRACKING_URI={ctx['tracking_uri']}\n"
        f"Resume this run with: sae-pipeline train --resume {run_id} (and the same config)",
        file=sys.stderr,
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from sae_pipeline.config import load_config

    cfg = load_config(_config_path(args.config), **_set_overrides(args.set))
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


# ingest flags -> the config fields they set
INGEST_FLAGS = {
    "source": "data.source",
    "format": "data.format",
    "query": "data.query",
    "contract": "data.contract",
    "label_column": "data.label_column",
    "id_column": "data.id_column",
}


def cmd_ingest(args: argparse.Namespace) -> int:
    from sae_pipeline import boundary, storage
    from sae_pipeline.config import load_config
    from sae_pipeline.data import ingest, snapshot
    from sae_pipeline.steps.deployment import check_data_locations

    overrides = _set_overrides(args.set)
    for flag, field in INGEST_FLAGS.items():
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    cfg = load_config(_config_path(args.config), **overrides)
    # Read from where a data_source may be, write where an artifact root may be: before any I/O.
    data = check_data_locations(cfg.data)
    out_dir = storage.normalize_root(boundary.artifact_location(args.output, "--output"))
    manifest = ingest.ingest(data, out_dir)
    print(json.dumps({"output": out_dir, **snapshot.summary(manifest, out_dir)}, indent=2))
    return 0


def _cli_run_id(given: str | None, command: str) -> str:
    """A run id for a CLI call: the given one (the same id finds that run's outputs again)."""
    if given:
        return given
    from datetime import UTC, datetime

    return f"cli_{command}__{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"


def cmd_encode(args: argparse.Namespace) -> int:
    from sae_pipeline.steps import encoding
    from sae_pipeline.steps.batch_context import batch_context

    encoding.check_sizes(args.chunk_rows, args.shard_rows)  # before any work
    params = {"batch": args.batch, "model_version": args.model_version, "config_path": args.config}
    ctx = batch_context(
        _cli_run_id(args.run_id, "encode"), params, overrides=_set_overrides(args.set)
    )
    ctx = encoding.prepare(ctx, args.output, args.chunk_rows, args.shard_rows)
    manifest = encoding.encode_batch(ctx, progress=not args.quiet)
    print(json.dumps({k: v for k, v in manifest.items() if k != "parts"}, indent=2))
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from sae_pipeline.steps import monitoring, review
    from sae_pipeline.steps.batch_context import batch_context

    policy_path = _config_path(args.policy, "--policy")  # as the monitor's policy_path param
    run_id = _cli_run_id(args.run_id, "drift")
    params = {"batch": args.batch, "model_version": args.model_version, "config_path": args.config}
    ctx = batch_context(run_id, params, overrides=_set_overrides(args.set))
    ctx = monitoring.prepare(ctx, policy_path, _set_overrides(args.policy_set))
    summary = monitoring.run_check(ctx, progress=not args.quiet)
    retrain_run = f"retrain__{ctx['run_key']}" if args.retrain else None
    print(json.dumps(review.act_here(ctx, summary, retrain_run), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sae_pipeline.config import load_config
    from sae_pipeline.registry import service, tracking
    from sae_pipeline.steps.deployment import check_local_output, check_tracking_uri

    # starts, switches and retries are INFO (normal events), shown without --verbose
    logging.getLogger(service.__name__).setLevel(logging.INFO)
    cfg = load_config(_config_path(args.config), **_set_overrides(args.set))
    check_tracking_uri(cfg.registry.tracking_uri)
    live_file = check_local_output(args.live_file, "--live-file")
    log_dir = check_local_output(args.log_dir, "--log-dir")
    client = tracking.client(cfg)
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(cfg)  # for the server processes
    supervisor = service.Supervisor(
        name=args.model or cfg.registry.encoder_model_name,
        alias=args.alias,
        host=args.host,
        port=args.port,
        env_manager=args.env_manager,
        plain=args.plain,
        blue_green=args.blue_green,
        live_file=live_file,
        log_dir=log_dir,
    )
    print(
        f"serving models:/{supervisor.name}@{args.alias} on http://{args.host}:{args.port} "
        f"(alias checked every {args.interval:g} s; Ctrl-C stops)",
        flush=True,
    )
    try:
        supervisor.run(client, interval=args.interval)
    except KeyboardInterrupt:
        pass
    except RuntimeError as err:
        from sae_pipeline.errors import RegistryError

        raise RegistryError(str(err)) from None
    return 0


def cmd_registry_migrate(args: argparse.Namespace) -> int:
    from sae_pipeline.config import load_config
    from sae_pipeline.registry.migrate import migrate_version
    from sae_pipeline.steps.deployment import check_tracking_uri

    cfg = load_config(_config_path(args.config), **_set_overrides(args.set))
    check_tracking_uri(cfg.registry.tracking_uri)
    print(json.dumps(migrate_version(cfg, args.version), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the training DAG through Airflow on the digits demo")
    p.add_argument("--workdir", default=".", help="where .airflow/ and artifacts/ go")
    p.add_argument("--conf", help="DAG run params as JSON, e.g. '{\"finetune_epochs\": 5}'")
    p.add_argument(
        "--no-loop", action="store_true", help="train only: skip encoding, drift and retraining"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "airflow", help="a local Airflow (standalone) with the DAGs, your config and policy"
    )
    p.add_argument("--port", type=int, default=8080, help="the UI's and API's port")
    p.add_argument(
        "--config", default=os.environ.get("SAE_CONFIG") or None,
        help="YAML config of the DAGs (default: $SAE_CONFIG, else the embedded digits demo)",
    )  # fmt: skip
    p.add_argument(
        "--policy", default=os.environ.get("SAE_DRIFT_POLICY") or None,
        help="drift policy YAML (default: $SAE_DRIFT_POLICY, else the built-in policy)",
    )  # fmt: skip
    p.add_argument("--workdir", default=".", help="where .airflow/ goes and tasks run")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the DAGs")
    p.set_defaults(func=cmd_airflow)

    p = sub.add_parser("encode", help="encode a Parquet batch with the champion (no Airflow)")
    p.add_argument("--batch", required=True, nargs="+", help="Parquet file(s) or folder(s)")
    p.add_argument("--output", help="output folder (default: <root>/encodings/<model>/v<n>/...)")
    p.add_argument("--model-version", help="encoder version (default: the champion)")
    p.add_argument("--chunk-rows", type=int, help="rows per streamed chunk (default 65536)")
    p.add_argument("--shard-rows", type=int, help="rows per shard (default 1,000,000)")
    p.add_argument("--config", help="YAML config: artifact root, MLflow URI, model names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-id", help="run id (default: new); staging folders are keyed by it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("drift", help="check a batch for drift against the champion (no Airflow)")
    p.add_argument("--batch", required=True, nargs="+", help="Parquet file(s) or folder(s)")
    p.add_argument("--model-version", help="encoder version (default: the champion)")
    p.add_argument(
        "--policy", help="drift policy YAML (default: $SAE_DRIFT_POLICY, else the built-in policy)"
    )
    p.add_argument(
        "--policy-set", action="append", default=[], metavar="KEY=VALUE",
        help="policy override, e.g. drift_share=0.3 or signals.codes.drift_share=0.2",
    )  # fmt: skip
    p.add_argument("--retrain", action="store_true", help="retrain here when the check asks")
    p.add_argument("--config", help="YAML config: artifact root, MLflow URI, model names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-id", help="run id (default: new); the same id returns that check")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("train", help="run every training step in this process (no Airflow)")
    p.add_argument("--config", help="YAML config (default: the embedded digits demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-id", help="id of the new run (default: a new one each time)")
    p.add_argument(
        "--resume", metavar="RUN_ID",
        help="continue run RUN_ID (after a failure); refused when the config differs from its own",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "ingest",
        help="validate a data source and write a snapshot, its quarantine and its manifest",
    )
    p.add_argument("--source", help="CSV/Parquet path or URL, SQLAlchemy URL, sklearn://<name>")
    p.add_argument("--output", required=True, help="folder for the snapshot (path or URL)")
    p.add_argument("--format", help="csv, parquet, sql or sklearn (default: guessed)")
    p.add_argument("--query", help="SQL query, when --source is a database URL")
    p.add_argument("--contract", help="contract.json or manifest.json to validate against")
    p.add_argument("--label-column", help="label column (default: target, when present)")
    p.add_argument("--id-column", help="id column carried through untouched")
    p.add_argument("--config", help="YAML config whose data section applies")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "serve",
        help="serve the champion encoder over HTTP (MLflow's scoring server), following the alias",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--alias", default="champion")
    p.add_argument("--model", help="registered model (default: registry.encoder_model_name)")
    p.add_argument(
        "--interval", type=float, default=30,
        help="seconds between alias checks; a new version is started, then the old one stopped "
        "(0: serve the current version only)",
    )  # fmt: skip
    p.add_argument(
        "--env-manager", default="local", choices=("local", "virtualenv", "uv", "conda"),
        help="local: this environment; others build the model's own (mlflow models serve)",
    )  # fmt: skip
    p.add_argument(
        "--plain", action="store_true",
        help="run `mlflow models serve` as is (no limits, batching, Arrow or /metrics)",
    )  # fmt: skip
    p.add_argument("--blue-green", action="store_true", help="switch between port and port+1")
    p.add_argument("--live-file", help="with --blue-green: file that holds the live port")
    p.add_argument("--log-dir", help="folder for the server processes' logs")
    p.add_argument("--config", help="YAML config: MLflow URI, model names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("registry", help="registry maintenance")
    reg = p.add_subparsers(dest="registry_command", required=True)
    p = reg.add_parser(
        "migrate", help="re-register a legacy (pickled) encoder version in the pickle-free format"
    )
    p.add_argument("--version", required=True, help="the encoder version to migrate")
    p.add_argument("--config", help="YAML config: MLflow URI, model names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_registry_migrate)

    p = sub.add_parser("config", help="validate a config and print it resolved")
    p.add_argument("--config", help="YAML config (default: the embedded digits demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sae_pipeline.errors import SaePipelineError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except SaePipelineError as err:
        print(f"sae-pipeline: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
