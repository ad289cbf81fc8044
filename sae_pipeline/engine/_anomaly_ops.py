"""Array helpers of ``SAEAnomalyDetector``: robust scaling, the members' numpy forward, kNN.

Everything here is plain float64 numpy on arrays the detector stores, so that scores are
exactly reproducible, independent of how rows are batched, and computable from the detector's
saved state without torch.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def robust_center_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column median and a robust spread (IQR / 1.349, else std, else 1) of ``x``."""
    center = np.median(x, axis=0)
    q75, q25 = np.percentile(x, [75, 25], axis=0)
    scale = (q75 - q25) / 1.349
    std = x.std(axis=0)
    scale = np.where(scale > EPS, scale, std)
    scale = np.where(scale > EPS, scale, 1.0)
    return center, scale


def member_forward(weights: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A member's encoder-decoder on scaled rows: (codes (n, k), reconstruction (n, d)).

    ``weights`` = [W1, b1, W2, b2, V2, c2, V1, c1] of ``StackedAutoencoderNet`` with
    ``hidden_dims=(h, k)``: ReLU hidden layers, linear code and output.
    """
    w1, b1, w2, b2, v2, c2, v1, c1 = weights
    h = np.maximum(x @ w1.T + b1, 0.0)  # (n, h)
    code = h @ w2.T + b2  # (n, k)
    g = np.maximum(code @ v2.T + c2, 0.0)  # (n, h)
    return code, g @ v1.T + c1  # (n, d)


def kth_neighbour_distance(
    queries: np.ndarray, points: np.ndarray, k: int, chunk: int = 4096
) -> np.ndarray:
    """Euclidean distance from each query row to its k-th nearest row of ``points``."""
    k = min(k, len(points))
    p2 = np.sum(points**2, axis=1)
    out = np.empty(len(queries))
    for i in range(0, len(queries), chunk):
        q = queries[i : i + chunk]
        d2 = np.sum(q**2, axis=1)[:, None] + p2[None, :] - 2.0 * q @ points.T  # (chunk, m)
        np.maximum(d2, 0.0, out=d2)
        out[i : i + chunk] = np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])
    return out


def state_outlyingness(meta: dict, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Outlyingness of raw rows ``x`` (higher = stranger) from ``SAEAnomalyDetector.to_state``.

    The registered encoder's runtime (``registry/_model_code/sae_model_runtime.py``) carries a
    copy of this function; a test checks that both give the detector's scores.
    """
    xs = (np.asarray(x, dtype=np.float64) - arrays["center"]) / arrays["scale"]  # (n, d)
    norms, w = arrays["norms"], float(meta["knn_weight"])  # norms: (members, 2, 2)
    total = np.zeros(len(xs))
    for i in range(int(meta["n_members"])):
        weights = [arrays[f"m{i}.w{j}"] for j in range(8)]
        codes, recon = member_forward(weights, xs)
        err = np.log1p(np.mean((recon - xs) ** 2 / arrays[f"m{i}.feature_error"], axis=1))
        ref = arrays[f"m{i}.codes"]
        knn = np.log1p(kth_neighbour_distance(codes, ref, min(int(meta["n_neighbors"]), len(ref))))
        total += (1.0 - w) * (err - norms[i, 0, 0]) / norms[i, 0, 1]
        total += w * (knn - norms[i, 1, 0]) / norms[i, 1, 1]
    return (total / int(meta["n_members"]) - meta["score_center"]) / meta["score_scale"]
