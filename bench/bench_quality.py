"""Quality on scikit-learn's digits, codes learned without labels, over several split seeds.

Protocol: pixels / 16; stratified 75/25 split; probe = StandardScaler + LogisticRegression
(max_iter=5000) fitted on the training codes, scored on the test codes. The SAE uses the
estimator's defaults (the settings the README recommends) with only the code size changed.

    .venv/bin/python bench/bench_quality.py [--seeds 0 1 2] [--codes 10 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

from sae_pipeline import StackedAutoencoder
from sae_pipeline.engine.evaluation import probe_accuracy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--codes", type=int, nargs="+", default=[10, 2])
    args = ap.parse_args()
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    defaults = StackedAutoencoder().get_params()
    print(
        f"SAE defaults: hidden_dims={defaults['hidden_dims']}, noise={defaults['noise']} "
        f"{defaults['noise_level']}, epochs {defaults['pretrain_epochs']}+"
        f"{defaults['finetune_epochs']}, lr schedule {defaults['lr_schedule']}"
    )
    header = f"{'code':>5}{'seed':>5}{'method':>22}{'test MSE':>10}"
    header += f"{'MSE/PCA':>9}{'probe acc':>11}{'s':>7}"
    print(header)
    summary: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for code in args.codes:
        for seed in args.seeds:
            x_tr, x_te, y_tr, y_te = train_test_split(
                x, y, test_size=0.25, stratify=y, random_state=seed
            )
            pca = PCA(n_components=code, random_state=0).fit(x_tr)
            pca_mse = float(np.mean((pca.inverse_transform(pca.transform(x_te)) - x_te) ** 2))
            rows = [
                (
                    "PCA",
                    pca_mse,
                    probe_accuracy(pca.transform(x_tr), y_tr, pca.transform(x_te), y_te, 5000),
                    0.0,
                )
            ]
            t0 = time.perf_counter()
            dims = (*defaults["hidden_dims"][:-1], code)
            sae = StackedAutoencoder(hidden_dims=dims, random_state=seed).fit(x_tr)
            secs = time.perf_counter() - t0
            mse = float(np.mean(sae.reconstruction_error(x_te)))
            acc = probe_accuracy(sae.transform(x_tr), y_tr, sae.transform(x_te), y_te, 5000)
            rows.append(("SAE fine-tuned", mse, acc, secs))
            pre = StackedAutoencoder(hidden_dims=dims, random_state=seed)
            pre.set_params(finetune_epochs=0).fit(x_tr)
            rows.append(
                (
                    "SAE pretrain only",
                    float(np.mean(pre.reconstruction_error(x_te))),
                    probe_accuracy(pre.transform(x_tr), y_tr, pre.transform(x_te), y_te, 5000),
                    0.0,
                )
            )
            if code == args.codes[0]:
                rows.append(
                    ("raw pixels", float("nan"), probe_accuracy(x_tr, y_tr, x_te, y_te, 5000), 0.0)
                )
            for name, m, a, s in rows:
                summary.setdefault((code, name), []).append((m, a))
                print(
                    f"{code:>5}{seed:>5}{name:>22}{m:>10.5f}{m / pca_mse:>9.3f}{a:>11.4f}{s:>7.1f}",
                    flush=True,
                )
    print("\nmean over seeds")
    for (code, name), vals in summary.items():
        m = np.mean([v[0] for v in vals])
        a = np.array([v[1] for v in vals])
        print(
            f"{code:>5} {name:>22}  test MSE {m:.5f}  "
            f"probe acc mean {a.mean():.4f} min {a.min():.4f}"
        )


if __name__ == "__main__":
    main()
