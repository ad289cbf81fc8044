"""Training at scale: each step of the training DAG in its own process, wall time and peak RSS.

Synthetic data (64 float32 features, a few latent factors plus noise) is generated in chunks to
a Parquet file under $TMPDIR for each size; the training DAG's steps then run one by one, each
in a fresh Python process as an Airflow worker runs it (``--step``), sharing the run's context.
One epoch per phase at batch 1024 (``--max-steps`` caps each phase), streamed: ingest and
validate chunk by chunk (``data.in_memory_max_bytes`` 0), training from the row cache that
``fit_scaler`` writes (``training.in_memory_max_bytes`` 0), so every size takes the same path.
``--train`` also runs ``sae-pipeline train`` (every step in one process) under
``/usr/bin/time -v``. Then, at the first size, the trainer's samples/s on the same rows,
side by side, alternated, best of ``--repeats``: in memory, streamed from the row cache (what
a streamed run trains from) and streamed from the snapshot's shards (``training.row_cache:
false``), ``--epochs`` epochs each.

    .venv/bin/python bench/bench_scale.py --rows 1000000 4000000 16000000 --train
    .venv/bin/python bench/bench_scale.py --rows 1000000 --steps none --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = ["ingest", "validate", "split", "fit_scaler", "pretrain_1", "pretrain_2", "pretrain_3",
         "finetune", "evaluate"]  # fmt: skip
FEATURES = 64


def generate(path: Path, rows: int, chunk: int = 1_000_000, seed: int = 0) -> None:
    """``rows`` x 64 float32 in row groups of ``chunk`` rows, never all in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, FEATURES)).astype(np.float32)  # the same factors for every seed
    rng = np.random.default_rng(seed) if seed else rng
    names = [f"f{j:02d}" for j in range(FEATURES)]
    with pq.ParquetWriter(path, pa.schema([(n, pa.float32()) for n in names])) as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            z = rng.normal(size=(n, 8)).astype(np.float32)
            x = z @ mix + 0.1 * rng.normal(size=(n, FEATURES)).astype(np.float32)
            w.write_table(pa.table({c: x[:, j] for j, c in enumerate(names)}))


def overrides(tmp: Path, source: Path, max_steps: int | None = None) -> dict:
    out = {
        "artifacts_root": str(tmp / "artifacts"),
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "data.source": str(source),
        "data.in_memory_max_bytes": 0,
        "training.pretrain.epochs": 1,
        "training.finetune.epochs": 1,
        "training.pretrain.batch_size": 1024,
        "training.finetune.batch_size": 1024,
        "training.in_memory_max_bytes": 0,
        "training.device": "cpu",
    }
    if max_steps:
        out |= {"training.pretrain.max_steps": max_steps, "training.finetune.max_steps": max_steps}
    return out


def _hwm_kib() -> int:
    # This process's own high-water mark: ru_maxrss from wait4 would also count the parent's
    # RSS, which Linux carries over fork and exec.
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1])


def run_step(step: str, ctx_file: Path) -> None:
    """One step, as a DAG task runs it (in a child process: ``--step``)."""
    from sae_pipeline.steps import training as steps

    ctx = json.loads(ctx_file.read_text())
    if step.startswith("pretrain_"):
        steps.pretrain_layer(ctx, int(step.split("_")[1]))
    else:
        getattr(steps, step)(ctx)
    print(f"VmHWM {_hwm_kib()}")


def measure(step: str, ctx_file: Path, env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one step in a fresh process."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--step", step, "--ctx", str(ctx_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    kib = int(proc.stdout.rsplit("VmHWM ", 1)[1].split()[0])
    return secs, kib / 2**20


def measure_train(tmp: Path, source: Path, max_steps: int | None, env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of ``sae-pipeline train``: every step in one process."""
    cli = Path(sys.executable).with_name("sae-pipeline")
    # Its own artifacts and run: nothing shared with the per-step run.
    sets = overrides(tmp, source, max_steps) | {"artifacts_root": str(tmp / "artifacts-train")}
    cmd = ["/usr/bin/time", "-v", str(cli), "train", "--run-id", "bench-train"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sae-pipeline train failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stderr.splitlines() if "Maximum resident set size" in ln)
    return secs, int(line.rsplit(":", 1)[1]) / 2**20


def check_codes(tmp: Path, rows: int = 20_000) -> float:
    """Largest |difference| between the codes of a held-out batch (new rows, another seed)
    through the registered pyfunc, as ``mlflow models serve`` loads it, and through batch
    encoding (the version's bundle, streamed in chunks); 0.0 means identical."""
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from sae_pipeline.data import batches
    from sae_pipeline.engine import batch_encoding
    from sae_pipeline.registry import bundle

    generate(tmp / "held_out.parquet", rows, seed=1)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = "models:/sae-digits-encoder@champion"
    served = mlflow.pyfunc.load_model(model).predict(pd.read_parquet(tmp / "held_out.parquet"))
    encoder = bundle.load_encoder(model, uri)
    parts = []
    for shard in batch_encoding.plan(batches.list_files(str(tmp / "held_out.parquet"))):
        out = batch_encoding.encode_shard(
            encoder, shard, str(tmp / f"codes-{shard['index']}.parquet"),
            str(tmp / f"quarantine-{shard['index']}.parquet"),
        )  # fmt: skip
        parts.append(pq.read_table(out["part"]).to_pandas()[encoder.code_columns])
    codes = pd.concat(parts, ignore_index=True).to_numpy()
    return float(np.abs(codes - served[encoder.code_columns].to_numpy()).max())


def samples_per_second(
    ctx: dict, repeats: int, max_steps: int | None, epochs: int
) -> dict[str, float]:
    """Fine-tuning throughput on the run's training part, ``epochs`` epochs: in memory,
    streamed from the row cache (what training uses) and streamed from the snapshot's shards
    (``training.row_cache: false``), alternated (the machine's other load is noise), best of
    ``repeats``."""
    import copy

    import torch

    from sae_pipeline.data.scaling import apply_scaler
    from sae_pipeline.engine import trainer
    from sae_pipeline.engine.net import build_net
    from sae_pipeline.steps import _training_stream as ts
    from sae_pipeline.steps._run import config_of
    from sae_pipeline.steps._training_net import architecture

    cfg, cpu = config_of(ctx), torch.device("cpu")
    phase = cfg.training.finetune.model_copy(update={"epochs": epochs})
    if max_steps:
        phase = phase.model_copy(update={"max_steps": max_steps})
    stream, x_val = ts.train_stream(ctx, cfg, phase.batch_size, 0, cpu)
    shards = copy.copy(stream)
    shards.cache = None
    x_val = x_val[:4096]
    parts = [x for x in ts.part_chunks(ctx, "train")]
    x_mem = torch.from_numpy(apply_scaler(stream.scaler, np.concatenate(parts)))  # as training
    del parts
    runs = (("in memory", x_mem, None), ("streaming", None, stream), ("shards", None, shards))
    best = dict.fromkeys([name for name, _, _ in runs], 0.0)
    for _ in range(repeats):
        for name, x_train, s in runs:
            net = build_net(architecture(cfg, FEATURES), seed=0)
            hist = trainer.finetune(net, x_train, x_val, phase, cfg.model, seed=0, stream=s)
            speed = hist.samples_seen / hist.step_seconds
            print(f"  {name:<10} {speed:10,.0f} samples/s", flush=True)
            best[name] = max(best[name], speed)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--steps", nargs="+", default=STEPS, help="DAG steps to measure, or none")
    ap.add_argument("--train", action="store_true", help="also `sae-pipeline train`")
    ap.add_argument("--repeats", type=int, default=3, help="throughput: best of this many")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--epochs", type=int, default=3, help="throughput: epochs per measurement")
    ap.add_argument("--max-steps", type=int, help="cap each training phase at this many steps")
    ap.add_argument(
        "--check-codes", action="store_true", help="after --train: service vs batch codes"
    )
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--step")
    ap.add_argument("--ctx", type=Path)
    args = ap.parse_args()
    if args.step:
        run_step(args.step, args.ctx)
        return 0
    env = dict(os.environ)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    from sae_pipeline.steps import training as steps

    wanted = [] if args.steps == ["none"] else args.steps
    # The steps before the last one asked for run too (they make its inputs); only the asked
    # ones are reported.
    steps_run = STEPS[: max((STEPS.index(s) + 1 for s in wanted), default=0)]
    table: dict[str, dict[int, tuple[float, float]]] = {s: {} for s in [*wanted, "train"]}
    speed = None
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="sae-bench-scale-") as d:
            tmp = Path(d)
            t0 = time.perf_counter()
            generate(tmp / "x.parquet", rows)
            print(f"{rows:,} rows generated in {time.perf_counter() - t0:.0f} s", flush=True)
            run_overrides = overrides(tmp, tmp / "x.parquet", args.max_steps)
            ctx = steps.prepare(f"bench-scale-{rows}", None, run_overrides)
            ctx_file = tmp / "ctx.json"
            ctx_file.write_text(json.dumps(ctx))
            for step in steps_run:
                secs, rss = measure(step, ctx_file, env)
                if step in wanted:
                    table[step][rows] = secs, rss
                print(f"  {step:<11} {secs:8.1f} s  {rss:6.2f} GiB", flush=True)
            if args.train:
                table["train"][rows] = measure_train(tmp, tmp / "x.parquet", args.max_steps, env)
                secs, rss = table["train"][rows]
                print(f"  {'train':<11} {secs:8.1f} s  {rss:6.2f} GiB", flush=True)
                if args.check_codes:
                    diff = check_codes(tmp)
                    print(f"  held-out codes, service vs batch: max |diff| {diff:g}", flush=True)
            if speed is None and not args.skip_throughput:
                for step in STEPS[len(steps_run) : 4]:  # it needs the snapshot, split, scaler
                    measure(step, ctx_file, env)
                speed = samples_per_second(ctx, args.repeats, args.max_steps, args.epochs)
    sizes = args.rows
    print("\n| step | " + " | ".join(f"{r / 1e6:g}M rows: s / peak RSS GiB" for r in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for step, cells_by_rows in table.items():
        if not cells_by_rows:
            continue
        name = "`sae-pipeline train` (one process)" if step == "train" else step
        cells = [f"{cells_by_rows[r][0]:.1f} / {cells_by_rows[r][1]:.2f}" for r in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if speed:
        mem, cached, shards = speed["in memory"], speed["streaming"], speed["shards"]
        print(f"\nfine-tuning at {sizes[0]:,} rows, batch 1024, {args.epochs} epochs, best of "
              f"{args.repeats}: in memory {mem:,.0f} samples/s; streamed from the row cache "
              f"{cached:,.0f} ({cached / mem:.0%}); streamed from the snapshot's shards "
              f"{shards:,.0f} ({shards / mem:.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
