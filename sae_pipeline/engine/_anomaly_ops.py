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


KIND = "sae-ensemble/2"  # /1: no isolation trees (``isolation_weight`` 0, norms (members, 2, 2))
TREE_ARRAYS = ("tree_feature", "tree_threshold", "tree_value")


def view_weights(knn_weight: float, isolation_weight: float) -> tuple[float, float, float]:
    """Weights of a member's three views: normalised error, code density, isolation depth."""
    rest = 1.0 - isolation_weight
    return rest * (1.0 - knn_weight), rest * knn_weight, isolation_weight


def state_outlyingness(meta: dict, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Outlyingness of raw rows ``x`` (higher = stranger) from ``SAEAnomalyDetector.to_state``.

    The registered encoder's runtime (``registry/_model_code/sae_model_runtime.py``) carries a
    copy of this function; a test checks that both give the detector's scores.
    """
    xs = (np.asarray(x, dtype=np.float64) - arrays["center"]) / arrays["scale"]  # (n, d)
    norms = arrays["norms"]  # (members, views, 2): median and spread of each view
    weights = view_weights(float(meta["knn_weight"]), float(meta.get("isolation_weight", 0.0)))
    total = np.zeros(len(xs))
    for i in range(int(meta["n_members"])):
        codes, recon = member_forward([arrays[f"m{i}.w{j}"] for j in range(8)], xs)
        err = np.log1p(np.mean((recon - xs) ** 2 / arrays[f"m{i}.feature_error"], axis=1))
        ref = arrays[f"m{i}.codes"]
        knn = np.log1p(kth_neighbour_distance(codes, ref, min(int(meta["n_neighbors"]), len(ref))))
        views = [err, knn]
        if weights[2] > 0:
            views.append(-isolation_depth(*(arrays[f"m{i}.{a}"] for a in TREE_ARRAYS), xs))
        for j, v in enumerate(views):
            total += weights[j] * (v - norms[i, j, 0]) / norms[i, j, 1]
    return (total / int(meta["n_members"]) - meta["score_center"]) / meta["score_scale"]


# ---- isolation trees ----------------------------------------------------------------------------
EULER_GAMMA = 0.5772156649015329


def average_path_length(n: np.ndarray | float) -> np.ndarray:
    """c(n): the mean depth at which a random binary search tree of ``n`` points ends an
    unsuccessful search (Liu et al. 2008); 0 for n <= 1, 1 for n = 2."""
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 2.0)
    c = 2.0 * (np.log(safe - 1.0) + EULER_GAMMA) - 2.0 * (safe - 1.0) / safe
    return np.where(n <= 1, 0.0, np.where(n <= 2, 1.0, c))


def isolation_trees(
    points: np.ndarray, n_trees: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_trees`` isolation trees grown on all of ``points`` (n, p), each to depth
    ceil(log2 n), as heap-ordered arrays (children of node i at 2i+1 and 2i+2), each
    (n_trees, 2 ** (depth + 1) - 1): split feature (-1 at a leaf), threshold, and at a leaf
    the path length it stands for (its depth + c(rows that reached it))."""
    depth = max(1, int(np.ceil(np.log2(max(len(points), 2)))))
    nodes = 2 ** (depth + 1) - 1
    feature = np.full((n_trees, nodes), -1, dtype=np.int64)
    threshold = np.zeros((n_trees, nodes))
    value = np.zeros((n_trees, nodes))
    for t in range(n_trees):
        stack = [(0, np.arange(len(points)), 0)]
        while stack:
            node, rows, level = stack.pop()
            x = points[rows]
            lo, hi = (x.min(axis=0), x.max(axis=0)) if len(rows) else (0.0, 0.0)
            spread = np.flatnonzero(hi > lo) if len(rows) > 1 else []
            if level >= depth or len(spread) == 0:
                value[t, node] = level + float(average_path_length(len(rows)))
                continue
            f = int(rng.choice(spread))
            cut = rng.uniform(lo[f], hi[f])
            feature[t, node], threshold[t, node] = f, cut
            left = x[:, f] < cut
            stack.append((2 * node + 1, rows[left], level + 1))
            stack.append((2 * node + 2, rows[~left], level + 1))
    return feature, threshold, value


def isolation_depth(
    feature: np.ndarray, threshold: np.ndarray, value: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """Mean path length of each row of ``x`` over the trees of ``isolation_trees`` (shorter:
    easier to isolate, stranger)."""
    rows = np.arange(len(x))
    total = np.zeros(len(x))
    depth = int(np.log2(feature.shape[1] + 1)) - 1
    for f, thr, val in zip(feature, threshold, value, strict=True):
        node = np.zeros(len(x), dtype=np.int64)
        for _ in range(depth):
            feat = f[node]
            inner = feat >= 0
            right = x[rows, np.maximum(feat, 0)] >= thr[node]
            node = np.where(inner, 2 * node + 1 + right, node)
        total += val[node]
    return total / len(feature)
