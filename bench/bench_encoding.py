"""Batch encoding throughput and memory, and the cost of one drift check.

1. Encoding: Parquet batches of 1M and 10M rows x 64 float32 features (generated once, in
   chunks, under --data-dir) are streamed through ``sae_pipeline.encoding`` (plan, shards,
   fixed-size chunks, quarantine check, Parquet out) with the default architecture
   (64 -> 256 -> 64 -> 10, minmax scaler). Each size runs in its own subprocess, which reports:
   - rows/s of the streaming encoder, end to end (read, check, scale, encode, write);
   - rows/s of the encoder's in-memory forward pass (scale + network + error, same chunk
     size, on rows already in memory), measured in the same process in short bursts before
     and after every shard (the machine is shared: both see the same conditions);
   - peak RSS of that process (ru_maxrss).
   Targets: peak RSS grows < 20% from 1M to 10M rows; streaming >= 70% of in-memory.
2. Drift: a champion is trained and registered (tiny epochs; the architecture is what
   counts), then one drift check of a 100k-row batch runs through ``monitoring`` as the DAG
   runs it (reference, read + encode, three Evidently reports, HTML/JSON, MLflow), once with
   the default policy (a 20k-row sample per side) and once on all rows; per-stage seconds.

    .venv/bin/python bench/bench_encoding.py [--sizes 1000000 10000000] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FEATURES = [f"f{i}" for i in range(64)]
GEN_ROWS = 131_072  # generation chunk = row group size of the benchmark files
HIDDEN = [256, 64, 10]  # the pipeline's default architecture


def rss_mb() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` x 64 float32 features + int64 id, written chunk by chunk (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("id", pa.int64())] + [(c, pa.float32()) for c in FEATURES])
    rng = np.random.default_rng(seed)
    means = rng.uniform(0, 8, len(FEATURES)).astype(np.float32)
    with pq.ParquetWriter(tmp, schema, compression="snappy", use_dictionary=False) as writer:
        for start in range(0, rows, GEN_ROWS):
            n = min(GEN_ROWS, rows - start)
            x = means + rng.standard_normal((n, len(FEATURES)), dtype=np.float32)
            cols = [pa.array(np.arange(start, start + n, dtype=np.int64))]
            cols += [pa.array(x[:, j]) for j in range(len(FEATURES))]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=GEN_ROWS)
    os.replace(tmp, path)


def bench_encoder(sample_path: Path):
    """The default architecture, seeded, with a minmax scaler fitted on the batch's head."""
    import pyarrow.parquet as pq

    from sae_pipeline.data.contract import Contract
    from sae_pipeline.data.scaling import fit_scaler
    from sae_pipeline.engine.encoder import Encoder
    from sae_pipeline.engine.net import Architecture, build_net

    head = pq.ParquetFile(sample_path).read_row_group(0, columns=FEATURES).to_pandas()
    contract = Contract(FEATURES, dict.fromkeys(FEATURES, "float32"), None, "id")
    net = build_net(Architecture(len(FEATURES), HIDDEN, output_activation="sigmoid"), seed=0)
    return Encoder(contract, fit_scaler("minmax", head.to_numpy()), net.eval())


def worker(path: Path, out_dir: Path, chunk_rows: int, shard_rows: int) -> dict:
    """One size, in its own process: streamed shard by shard, with in-memory bursts between.

    This machine is shared, so its speed drifts over a run; measuring the in-memory pass in
    short bursts before and after every shard gives both measures the same conditions.
    """
    import pyarrow.parquet as pq
    import torch

    from sae_pipeline.data import batches
    from sae_pipeline.engine import batch_encoding
    from sae_pipeline.engine import encoder as encoder_mod

    torch.set_num_threads(os.cpu_count() or 1)
    encoder = bench_encoder(path)
    # Rows already in memory: four chunks, float64 and column-major as a DataFrame holds them.
    pf = pq.ParquetFile(path)
    x = np.asfortranarray(pf.read_row_group(0, columns=FEATURES).to_pandas().to_numpy(np.float64))
    x = x[: 4 * chunk_rows]
    encoder_mod.encode_rows(encoder, x[:chunk_rows])  # warm-up
    baseline = rss_mb()
    memory = {"rows": 0, "wall": 0.0, "cpu": 0.0}

    def burst(seconds: float = 1.0) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            for i in range(0, len(x), chunk_rows):
                encoder_mod.encode_rows(encoder, x[i : i + chunk_rows])
            memory["rows"] += len(x)
        memory["wall"] += time.perf_counter() - t0
        memory["cpu"] += time.process_time() - c0

    files = batches.list_files(str(path))
    shards = batch_encoding.plan(files, shard_rows)
    rows = encoded = 0
    stream_wall = stream_cpu = 0.0
    for s in shards:
        burst()
        t0, c0 = time.perf_counter(), time.process_time()
        r = batch_encoding.encode_shard(
            encoder, s, str(out_dir / f"part-{s['index']:05d}.parquet"),
            str(out_dir / f"_quarantine/part-{s['index']:05d}.parquet"),
            id_column="id", chunk_rows=chunk_rows,
        )  # fmt: skip
        stream_wall += time.perf_counter() - t0
        stream_cpu += time.process_time() - c0
        rows += r["rows_in"]
        encoded += r["rows_encoded"]
    burst()
    peak = peak_rss_mb()
    # The network alone (no scaling, no error): for reference.
    xs = torch.from_numpy(encoder.scaler.transform(x).astype(np.float32))
    done, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - t0 < 2.0:
            for i in range(0, len(xs), chunk_rows):
                encoder.net(xs[i : i + chunk_rows])
            done += len(xs)
    net_rows_s = done / (time.perf_counter() - t0)
    return {
        "rows": rows,
        "rows_encoded": encoded,
        "shards": len(shards),
        "stream_seconds": round(stream_wall, 2),
        "stream_rows_per_s": rows / stream_wall,
        "stream_rows_per_cpu_s": rows / stream_cpu,
        "in_memory_rows_per_s": memory["rows"] / memory["wall"],
        "in_memory_rows_per_cpu_s": memory["rows"] / memory["cpu"],
        "network_only_rows_per_s": net_rows_s,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "input_mb": path.stat().st_size / 2**20,
        "load_average": os.getloadavg(),
    }


def run_sizes(sizes: list[int], data_dir: Path, chunk_rows: int, shard_rows: int) -> list[dict]:
    results = []
    for n in sizes:
        path = data_dir / f"batch_{n}.parquet"
        t0 = time.perf_counter()
        generate(path, n)
        size = path.stat().st_size / 2**20
        print(f"data {path} ({size:.0f} MiB) in {time.perf_counter() - t0:.0f} s", flush=True)
        out = Path(tempfile.mkdtemp(prefix="encoded-", dir=data_dir))
        try:
            cmd = [sys.executable, __file__, "--worker", str(path), "--out", str(out),
                   "--chunk-rows", str(chunk_rows), "--shard-rows", str(shard_rows)]  # fmt: skip
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        r = results[-1]
        print(f"{n:>11,} rows: {r['stream_rows_per_s']:,.0f} rows/s streaming, "
              f"{r['in_memory_rows_per_s']:,.0f} in memory, peak RSS {r['peak_rss_mb']:.0f} MiB",
              flush=True)  # fmt: skip
    return results


def encoding_table(results: list[dict]) -> str:
    lines = [
        "| rows | shards | streaming rows/s | in-memory rows/s | streaming / in-memory "
        "| same, per CPU-second | network alone rows/s | peak RSS MiB "
        "| RSS before streaming MiB | input MiB | load avg (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['shards']} | {r['stream_rows_per_s']:,.0f} "
            f"| {r['in_memory_rows_per_s']:,.0f} "
            f"| {r['stream_rows_per_s'] / r['in_memory_rows_per_s']:.0%} "
            f"| {r['stream_rows_per_cpu_s'] / r['in_memory_rows_per_cpu_s']:.0%} "
            f"| {r['network_only_rows_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} "
            f"| {r['baseline_rss_mb']:,.0f} | {r['input_mb']:,.0f} | {r['load_average'][0]:.1f} |"
        )
    return "\n".join(lines)


# ---- drift ------------------------------------------------------------------------------------
def drift_bench(data_dir: Path, rows: int = 100_000) -> dict:
    """Train and register a champion on ``rows`` rows, then time drift checks of a batch."""
    import logging

    import pandas as pd

    from sae_pipeline.data import batches
    from sae_pipeline.steps import monitoring
    from sae_pipeline.steps.training import run_training

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="drift-", dir=data_dir))
    rng = np.random.default_rng(1)
    means = rng.uniform(0, 8, len(FEATURES))
    train = pd.DataFrame(means + rng.normal(size=(rows, 64)), columns=FEATURES)
    batch = pd.DataFrame(means + rng.normal(size=(rows, 64)), columns=FEATURES)
    batch.iloc[:, :16] += 0.3  # a mild shift in a quarter of the features
    train.to_parquet(work / "train.parquet", index=False)
    batch.to_parquet(work / "batch.parquet", index=False)
    store = {
        "artifacts_root": str(work / "artifacts"),
        "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
    }
    t0 = time.perf_counter()
    run_training(
        "bench",
        overrides={
            "data.source": str(work / "train.parquet"),
            "data.label_column": None,
            "artifacts_root": store["artifacts_root"],
            "registry.tracking_uri": store["tracking_uri"],
            "model.hidden_dims": HIDDEN,
            "training.pretrain.epochs": 1,
            "training.finetune.epochs": 1,
        },
    )
    train_s = time.perf_counter() - t0
    out = {"train_and_register_seconds": round(train_s, 1), "checks": {}}
    for label, sample in (("default policy (20k-row samples)", None), ("all rows", 0)):
        params = {**store, "batch": str(work / "batch.parquet")}
        if sample is not None:
            params["sample_rows"] = sample
        t0 = time.perf_counter()
        ctx = monitoring.context(f"bench__{sample}", params)
        t_ctx = time.perf_counter() - t0
        t1 = time.perf_counter()
        ref = monitoring.reference(ctx)
        t_ref = time.perf_counter() - t1
        t2 = time.perf_counter()
        summary = monitoring.check(ctx, ref)
        t_check = time.perf_counter() - t2
        full = json.loads((Path(summary["report_dir"]) / "summary.json").read_text())
        out["checks"][label] = {
            "total_seconds": round(time.perf_counter() - t0, 2),
            "context_seconds": round(t_ctx, 2),
            "reference_seconds": round(t_ref, 2),
            "check_seconds": round(t_check, 2),
            "stages": full["timings"],
            "rows_tested": full["rows_tested"],
            "rows_reference": full["rows_reference"],
            "decision": full["decision"],
            "drift_share": summary["drift_share"],
        }
    shutil.rmtree(work, ignore_errors=True)
    _ = batches  # the context above reads the batch through sae_pipeline.batches
    return out


def drift_table(out: dict) -> str:
    lines = [f"champion trained and registered in {out['train_and_register_seconds']} s (setup)"]
    for label, c in out["checks"].items():
        lines.append("")
        lines.append(
            f"drift check, 100,000-row batch, {label}: {c['total_seconds']} s "
            f"({c['rows_tested']:,} batch rows vs {c['rows_reference']:,} reference rows tested; "
            f"decision {c['decision']}, drift share {c['drift_share']})"
        )
        stages = {
            "resolve champion, load encoder, inspect batch": c["context_seconds"],
            "reference (encode training snapshot; cached per version)": c["reference_seconds"],
            **c["stages"],
        }
        lines.append("| stage | seconds | share |")
        lines.append("|---|---:|---:|")
        for name, s in sorted(stages.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {s:.2f} | {s / c['total_seconds']:.0%} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "sae-bench"))
    p.add_argument("--chunk-rows", type=int, default=65_536)
    # Small shards (2 row groups) so that in-memory bursts interleave often with streaming.
    p.add_argument("--shard-rows", type=int, default=2 * GEN_ROWS)
    p.add_argument("--skip-drift", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker(Path(args.worker), Path(args.out), args.chunk_rows, args.shard_rows)
        print(json.dumps(result))
        return 0
    data_dir = Path(args.data_dir)
    results = run_sizes(args.sizes, data_dir, args.chunk_rows, args.shard_rows)
    print()
    print(f"Encoding ({os.cpu_count()} CPU cores; chunk {args.chunk_rows:,} rows, "
          f"shard {args.shard_rows:,} rows, 64 -> {' -> '.join(map(str, HIDDEN))})")  # fmt: skip
    print(encoding_table(results))
    ok = True
    if len(results) > 1:
        growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"] - 1
        mem_ok = growth < 0.20
        ok &= mem_ok
        print(f"peak RSS growth {results[0]['rows']:,} -> {results[-1]['rows']:,} rows: "
              f"{growth:+.1%} (target < +20%): {'PASS' if mem_ok else 'FAIL'}")  # fmt: skip
    for r in results:
        ratio = r["stream_rows_per_s"] / r["in_memory_rows_per_s"]
        ok &= ratio >= 0.7
        print(f"streaming / in-memory at {r['rows']:,} rows: {ratio:.0%} (target >= 70%): "
              f"{'PASS' if ratio >= 0.7 else 'FAIL'}")  # fmt: skip
    if not args.skip_drift:
        print()
        print(drift_table(drift_bench(data_dir)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
