"""Anomaly detection: ``SAEAnomalyDetector`` against the standard detectors.

    python bench/bench_anomaly.py                 # the six ADBench datasets, seeds 0-4
    python bench/bench_anomaly.py --suite dev     # the development sets (bench/anomaly_dev.py)

ADBench's unsupervised protocol: a stratified 70/30 split per seed, every method fitted on the
70% with the labels unused (anomalies included), ROC AUC and PR AUC (average precision) of its
scores on the 30%. Methods:

* ``detector``: ``SAEAnomalyDetector(random_state=seed)``, its defaults;
* ``iforest``: ``IsolationForest(random_state=seed)``;
* ``pca``: PCA with k components fitted on min-max scaled rows, reconstruction error;
* ``sae``: ``StackedAutoencoder(hidden_dims=(64, 32, k))`` on min-max scaled rows, its
  reconstruction error, fine-tuning off (the issue's better variant) and 10 pretraining
  epochs per layer to keep the run short;
* ``lof``: ``LocalOutlierFactor(novelty=True)`` (20 neighbours), on min-max scaled rows;
* ``ecod``: PyOD's ``ECOD()`` (Li et al., TKDE 2022: per-feature empirical tail
  probabilities; no parameters to tune, deterministic), on the raw rows;

with k = max(2, min(8, features // 4)) (the issue's rule). Fit seconds are per fit on this
machine.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import LocalOutlierFactor
from sklearn.preprocessing import MinMaxScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anomaly_dev

from sae_pipeline import SAEAnomalyDetector, StackedAutoencoder

ADBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "adbench"
SIX = ("6_cardio", "2_annthyroid", "23_mammography", "28_pendigits", "30_satellite", "32_shuttle")
METHODS = ("detector", "iforest", "pca", "sae", "lof", "ecod")


def code_size(d: int) -> int:
    return max(2, min(8, d // 4))


def outlyingness(method: str, x_tr: np.ndarray, x_te: np.ndarray, seed: int, **kw) -> np.ndarray:
    """Fit ``method`` on ``x_tr``; scores of ``x_te``, higher = more anomalous."""
    if method == "detector":
        return -SAEAnomalyDetector(random_state=seed, **kw).fit(x_tr).score_samples(x_te)
    if method == "iforest":
        return -IsolationForest(random_state=seed).fit(x_tr).score_samples(x_te)
    if method == "ecod":
        from pyod.models.ecod import ECOD  # the dev extra's; numba's start-up only here

        return ECOD().fit(x_tr).decision_function(x_te)
    scaler = MinMaxScaler().fit(x_tr)
    a, b = scaler.transform(x_tr), np.clip(scaler.transform(x_te), -1.0, 2.0)
    k = code_size(x_tr.shape[1])
    if method == "pca":
        pca = PCA(n_components=min(k, a.shape[1]), random_state=seed).fit(a)
        return np.mean((pca.inverse_transform(pca.transform(b)) - b) ** 2, axis=1)
    if method == "sae":
        sae = StackedAutoencoder(
            hidden_dims=(64, 32, k), pretrain_epochs=10, finetune_epochs=0, random_state=seed
        ).fit(a.astype(np.float32))
        return sae.reconstruction_error(b.astype(np.float32))
    if method == "lof":
        return -LocalOutlierFactor(novelty=True).fit(a).score_samples(b)
    raise ValueError(method)


def load(suite: str, name: str, seed: int):
    if suite == "adbench":
        with np.load(ADBENCH / f"{name}.npz", allow_pickle=False) as z:
            return z["X"].astype(np.float64), z["y"].astype(int)
    return anomaly_dev.load(name, seed)


def run(suite: str, names, seeds, methods, detector_kw: dict) -> dict:
    """{(dataset, method): [(roc, pr, fit seconds) per seed]}."""
    results: dict = {}
    for name in names:
        for seed in seeds:
            x, y = load(suite, name, seed)
            x_tr, x_te, _, y_te = train_test_split(
                x, y, test_size=0.3, stratify=y, random_state=seed
            )
            for method in methods:
                t0 = time.perf_counter()
                s = outlyingness(
                    method, x_tr, x_te, seed, **(detector_kw if method == "detector" else {})
                )
                dt = time.perf_counter() - t0
                results.setdefault((name, method), []).append(
                    (roc_auc_score(y_te, s), average_precision_score(y_te, s), dt)
                )
            print(f"  {name} seed {seed} done", file=sys.stderr, flush=True)
    return results


def table(results: dict, names, methods) -> str:
    head = "| dataset | " + " | ".join(f"{m} ROC / PR" for m in methods) + " |"
    lines = [head, "|---|" + "---|" * len(methods)]
    means = {m: [] for m in methods}
    for name in names:
        cells = []
        for m in methods:
            r = np.mean(results[(name, m)], axis=0)
            means[m].append(r)
            cells.append(f"{r[0]:.3f} / {r[1]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [
        f"**{np.mean(means[m], axis=0)[0]:.3f} / {np.mean(means[m], axis=0)[1]:.3f}**"
        for m in methods
    ]
    lines.append("| mean | " + " | ".join(cells) + " |")
    secs = [f"{np.mean(means[m], axis=0)[2]:.2f}" for m in methods]
    lines.append("| fit + score s (mean) | " + " | ".join(secs) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("adbench", "dev"), default="adbench")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--datasets", nargs="+")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--set", nargs="*", default=[], help="detector options, e.g. knn_weight=0.3")
    args = p.parse_args(argv)
    import torch

    # Small nets on a shared CPU: one thread is faster (a second one only synchronises).
    torch.set_num_threads(1)
    names = args.datasets or (
        SIX if args.suite == "adbench" else (*anomaly_dev.SYNTHETIC, *anomaly_dev.REAL)
    )
    detector_kw = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    results: dict = {}
    for i, name in enumerate(names):  # the table so far after each dataset: a long run shows
        results |= run(args.suite, [name], args.seeds, args.methods, detector_kw)
        print(table(results, names[: i + 1], args.methods), file=sys.stderr, flush=True)
    print(f"suite={args.suite} seeds={args.seeds} detector options={detector_kw or 'defaults'}")
    print(table(results, names, args.methods))
    # The means unrounded: two methods can tie to three decimals.
    means = {m: np.mean([np.mean(results[(n, m)], axis=0)[0] for n in names]) for m in args.methods}
    print("mean ROC AUC to 5 decimals: " + ", ".join(f"{m} {v:.5f}" for m, v in means.items()))


if __name__ == "__main__":
    main()
