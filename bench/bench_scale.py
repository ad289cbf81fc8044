"""Training at scale: each step of the training DAG in its own process, wall time and peak RSS.

Synthetic data (64 float32 features, a few latent factors plus noise) is generated in chunks to
a Parquet file under $TMPDIR for each size; the training DAG's steps then run one by one, each
in a fresh Python process as an Airflow worker runs it (``--step``), sharing the run's context.
One epoch per phase at batch 1024, streamed from the snapshot (``training.in_memory_max_bytes``
is 0 here, so every size takes the same path). Then, at the first size, the trainer's samples/s
streaming vs in memory on the same rows, side by side.

    .venv/bin/python bench/bench_scale.py --rows 1000000 4000000 16000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = ["ingest", "validate", "split", "fit_scaler", "pretrain_1", "pretrain_2", "pretrain_3",
         "finetune", "evaluate"]  # fmt: skip
FEATURES = 64


def generate(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    """``rows`` x 64 float32 in row groups of ``chunk`` rows, never all in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, FEATURES)).astype(np.float32)
    names = [f"f{j:02d}" for j in range(FEATURES)]
    with pq.ParquetWriter(path, pa.schema([(n, pa.float32()) for n in names])) as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            z = rng.normal(size=(n, 8)).astype(np.float32)
            x = z @ mix + 0.1 * rng.normal(size=(n, FEATURES)).astype(np.float32)
            w.write_table(pa.table({c: x[:, j] for j, c in enumerate(names)}))


def overrides(tmp: Path, source: Path) -> dict:
    return {
        "artifacts_root": str(tmp / "artifacts"),
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "data.source": str(source),
        "data.label_column": None,
        "training.pretrain.epochs": 1,
        "training.finetune.epochs": 1,
        "training.pretrain.batch_size": 1024,
        "training.finetune.batch_size": 1024,
        "training.in_memory_max_bytes": 0,
        "training.device": "cpu",
    }


def run_step(step: str, ctx_file: Path) -> None:
    """One step, as a DAG task runs it (in a child process: ``--step``)."""
    from sae_pipeline.steps import training as steps

    ctx = json.loads(ctx_file.read_text())
    if step.startswith("pretrain_"):
        steps.pretrain_layer(ctx, int(step.split("_")[1]))
    else:
        getattr(steps, step)(ctx)
    # This process's own high-water mark: ru_maxrss from wait4 would also count the parent's
    # RSS, which Linux carries over fork and exec.
    status = Path("/proc/self/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    print(f"VmHWM {int(hwm.split()[1])}")


def measure(step: str, ctx_file: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one step in a fresh process."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--step", step, "--ctx", str(ctx_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    kib = int(proc.stdout.rsplit("VmHWM ", 1)[1].split()[0])
    return secs, kib / 2**20


def samples_per_second(ctx: dict) -> dict[str, float]:
    """Fine-tuning throughput on the run's training part: streamed vs in memory."""
    import torch

    from sae_pipeline.engine import trainer
    from sae_pipeline.engine.net import build_net
    from sae_pipeline.steps import _training_stream as ts
    from sae_pipeline.steps._run import config_of
    from sae_pipeline.steps._training_net import architecture

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg, cpu = config_of(ctx), torch.device("cpu")
    phase = cfg.training.finetune
    stream, x_val = ts.train_stream(ctx, cfg, phase.batch_size, 0, cpu)
    x_val = x_val[:4096]
    parts = [x for x in ts.part_chunks(ctx, "train")]
    x_mem = torch.from_numpy(np.concatenate(parts) * stream.mult + stream.add)
    del parts
    best = {"in memory": 0.0, "streaming": 0.0}
    for _ in range(3):  # alternated, best of three: the machine's other load is noise
        for name, x_train, s in (("in memory", x_mem, None), ("streaming", None, stream)):
            net = build_net(architecture(cfg, FEATURES), seed=0)
            hist = trainer.finetune(net, x_train, x_val, phase, cfg.model, seed=0, stream=s)
            best[name] = max(best[name], hist.samples_seen / hist.step_seconds)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--step")
    ap.add_argument("--ctx", type=Path)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    if args.step:
        run_step(args.step, args.ctx)
        return 0
    from sae_pipeline.steps import training as steps

    table: dict[str, dict[int, tuple[float, float]]] = {s: {} for s in STEPS}
    speed = None
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="sae-bench-scale-") as d:
            tmp = Path(d)
            t0 = time.perf_counter()
            generate(tmp / "x.parquet", rows)
            print(f"{rows:,} rows generated in {time.perf_counter() - t0:.0f} s", flush=True)
            ctx = steps.prepare(f"bench-scale-{rows}", None, overrides(tmp, tmp / "x.parquet"))
            ctx_file = tmp / "ctx.json"
            ctx_file.write_text(json.dumps(ctx))
            for step in STEPS:
                table[step][rows] = measure(step, ctx_file)
                secs, rss = table[step][rows]
                print(f"  {step:<11} {secs:8.1f} s  {rss:6.2f} GiB", flush=True)
            if speed is None and not args.skip_throughput:
                speed = samples_per_second(ctx)
    sizes = args.rows
    print("\n| step | " + " | ".join(f"{r / 1e6:g}M rows: s / peak RSS GiB" for r in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for step in STEPS:
        cells = [f"{table[step][r][0]:.1f} / {table[step][r][1]:.2f}" for r in sizes]
        print(f"| {step} | " + " | ".join(cells) + " |")
    if speed:
        ratio = speed["streaming"] / speed["in memory"]
        print(f"\nfine-tuning at {sizes[0]:,} rows, batch 1024: in memory "
              f"{speed['in memory']:,.0f} samples/s, streaming {speed['streaming']:,.0f} "
              f"samples/s ({ratio:.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
