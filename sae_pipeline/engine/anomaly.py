"""``SAEAnomalyDetector``: an unsupervised outlier detector built from small stacked autoencoders.

    from sae_pipeline import SAEAnomalyDetector
    det = SAEAnomalyDetector(random_state=0).fit(X)    # X: rows of any width, any scale
    det.score_samples(X)        # higher = more normal (IsolationForest's convention)
    det.predict(X)              # +1 normal, -1 outlier

An ensemble of ``n_estimators`` autoencoders (``StackedAutoencoder`` with two layers, sized from
the data's width), each trained briefly on its own random subsample of at most ``max_samples``
rows. Small samples and few epochs keep a member from memorising the anomalies that the
(contaminated) training data holds; the ensemble averages their disagreements out. A row's
score combines, per member and each in robust z units of the training rows:

* the reconstruction error with every feature's squared error divided by that feature's typical
  error on the member's sample (a feature the net reconstructs well is not drowned out by one
  it reconstructs badly);
* the distance from the row's code to its ``n_neighbors``-th nearest code of the member's sample
  (a density score on the codes: an anomaly can be reconstructed well yet lie where no normal
  row does);
* how early ``n_trees`` isolation trees grown on the member's sample isolate the row (Liu et al.,
  ICDM 2008): a view that needs no model of the data, so it catches rows that sit apart from
  the rest in a few features even where the small net has learned to reconstruct them.

The detector's state (scaler, members' weights, normalisers) is plain arrays: ``to_state``
returns it as JSON-able metadata plus arrays (no pickle), which the registered encoder's
runtime scores rows from.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from sae_pipeline.engine import _anomaly_ops as ops

AUTO_OFFSET = -3.0  # contamination="auto": outlier beyond 3 robust SDs of the training scores
ERROR_FLOOR = 1e-2  # per-feature error normaliser floor, in squared robust-z units


def layer_sizes(n_features: int) -> tuple[int, int]:
    """(hidden width, code size) for data ``n_features`` wide: a bottleneck of about a quarter."""
    code = int(max(2, min(16, np.ceil(n_features / 4))))
    hidden = int(max(8, min(64, 2 * n_features)))
    return hidden, code


def _median_spread(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of ``values``; the standard deviation (or 1) when MAD is 0."""
    med = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - med)))
    if mad > ops.EPS:
        return med, mad
    std = float(values.std())
    return med, (std if std > ops.EPS else 1.0)


class SAEAnomalyDetector(OutlierMixin, BaseEstimator):
    """Unsupervised outlier detector: an ensemble of briefly trained small autoencoders.

    ``contamination="auto"`` puts the threshold at ``AUTO_OFFSET`` (3 robust standard
    deviations of the training rows' scores); a fraction puts it at that percentile of the
    training rows' scores. ``isolation_weight`` is the isolation depth's share of a member's
    score; ``knn_weight`` splits the rest between the code-density score (1) and the normalised
    reconstruction error (0).
    """

    _parameter_constraints: ClassVar[dict] = {
        "n_estimators": [Interval(Integral, 1, None, closed="left")],
        "max_samples": [Interval(Integral, 2, None, closed="left")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "knn_weight": [Interval(Real, 0, 1, closed="both")],
        "isolation_weight": [Interval(Real, 0, 1, closed="both")],
        "n_trees": [Interval(Integral, 1, None, closed="left")],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        n_estimators: int = 10,
        max_samples: int = 256,
        epochs: int = 20,
        n_neighbors: int = 5,
        knn_weight: float = 0.25,
        isolation_weight: float = 0.35,
        n_trees: int = 10,
        contamination: str | float = "auto",
        random_state: int | np.random.RandomState | None = None,
    ):
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.epochs = epochs
        self.n_neighbors = n_neighbors
        self.knn_weight = knn_weight
        self.isolation_weight = isolation_weight
        self.n_trees = n_trees
        self.contamination = contamination
        self.random_state = random_state

    # ---- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Train the members on random subsamples of ``X``; set the score normalisers."""
        self._validate_params()
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        rng = check_random_state(self.random_state)
        self.center_, self.scale_ = ops.robust_center_scale(X)
        xs = (X - self.center_) / self.scale_  # (n, d)
        self.hidden_size_, self.code_size_ = layer_sizes(X.shape[1])
        m = min(self.max_samples, len(X))
        self.members_: list[dict[str, Any]] = []
        threads = torch.get_num_threads()
        # The members' matrices are tiny: a second thread only adds synchronisation (measured
        # 10x slower per step on a busy 2-core machine).
        torch.set_num_threads(1)
        try:
            for _ in range(self.n_estimators):
                rows = np.sort(rng.choice(len(X), size=m, replace=False))
                seed = int(rng.randint(0, 2**31 - 1))
                self.members_.append(self._fit_member(xs[rows], seed))
        finally:
            torch.set_num_threads(threads)
        parts = [self._member_components(member, xs) for member in self.members_]
        self.norms_ = np.array([[_median_spread(v) for v in views] for views in parts])
        weights = ops.view_weights(self.knn_weight, self.isolation_weight)
        raw = np.mean(
            [
                sum(
                    w * (v - norm[j, 0]) / norm[j, 1]
                    for j, (w, v) in enumerate(zip(weights, views, strict=True))
                )
                for views, norm in zip(parts, self.norms_, strict=True)
            ],
            axis=0,
        )  # (n,) outlyingness averaged over the members
        self.score_center_, self.score_scale_ = _median_spread(raw)
        train_scores = -(raw - self.score_center_) / self.score_scale_
        if self.contamination == "auto":
            self.offset_ = AUTO_OFFSET
        else:
            self.offset_ = float(np.percentile(train_scores, 100.0 * self.contamination))
        return self

    def _fit_member(self, sample: np.ndarray, seed: int) -> dict[str, Any]:
        """One small SAE on ``sample`` (scaled rows); its weights as float64 arrays."""
        from sae_pipeline.engine.estimator import StackedAutoencoder

        # Clipping the training rows keeps a few extreme values from dominating the loss of a
        # tiny net; scoring uses the unclipped rows, so those values still stand out.
        train = np.clip(sample, -10.0, 10.0).astype(np.float32)
        sae = StackedAutoencoder(
            hidden_dims=(self.hidden_size_, self.code_size_),
            output_activation="linear",
            noise="gaussian",
            noise_level=0.1,
            batch_size=32,
            pretrain_epochs=max(1, self.epochs // 2),
            finetune_epochs=self.epochs,
            finetune_learning_rate=3e-3,
            lr_schedule="constant",
            validation_fraction=0.0,
            device="cpu",
            amp=False,
            random_state=seed,
        ).fit(train)
        state = sae.net_.state_dict()
        names = [
            "encoders.0.weight", "encoders.0.bias", "encoders.1.weight", "encoders.1.bias",
            "decoders.1.weight", "decoders.1.bias", "decoders.0.weight", "decoders.0.bias",
        ]  # fmt: skip
        weights = [state[k].detach().double().numpy().copy() for k in names]
        codes, recon = ops.member_forward(weights, sample)
        feature_error = np.mean((recon - sample) ** 2, axis=0) + ERROR_FLOOR  # (d,)
        member = {"weights": weights, "codes": codes, "feature_error": feature_error}
        if self.isolation_weight > 0:
            trees = ops.isolation_trees(sample, self.n_trees, np.random.default_rng(seed))
            member |= dict(zip(ops.TREE_ARRAYS, trees, strict=True))
        return member

    def _member_components(self, member: dict[str, Any], xs: np.ndarray):
        codes, recon = ops.member_forward(member["weights"], xs)
        err = np.mean((recon - xs) ** 2 / member["feature_error"], axis=1)  # (n,)
        k = min(self.n_neighbors, len(member["codes"]))
        knn = ops.kth_neighbour_distance(codes, member["codes"], k)  # (n,)
        if self.isolation_weight > 0:
            iso = -ops.isolation_depth(*(member[a] for a in ops.TREE_ARRAYS), xs)  # (n,)
        else:
            iso = np.zeros(len(xs))
        return np.log1p(err), np.log1p(knn), iso

    # ---- scoring -------------------------------------------------------------------------------
    def score_samples(self, X) -> np.ndarray:
        """Normality per row (higher = more normal), in robust SDs of the training rows."""
        check_is_fitted(self, "members_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return -ops.state_outlyingness(*self.to_state(), X)

    def decision_function(self, X) -> np.ndarray:
        """``score_samples - offset_``: negative for outliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for inliers, -1 for outliers."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    # ---- state as plain data -------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named float64 arrays): everything ``score_state`` needs."""
        check_is_fitted(self, "members_")
        meta: dict[str, Any] = {
            "kind": ops.KIND,
            "n_members": len(self.members_),
            "n_neighbors": int(self.n_neighbors),
            "knn_weight": float(self.knn_weight),
            "isolation_weight": float(self.isolation_weight),
            "score_center": self.score_center_,
            "score_scale": self.score_scale_,
            "offset": float(self.offset_),
            "threshold": -float(self.offset_),  # outlyingness above it: an anomaly
        }
        arrays = {"center": self.center_, "scale": self.scale_, "norms": self.norms_}
        for i, member in enumerate(self.members_):
            for j, w in enumerate(member["weights"]):
                arrays[f"m{i}.w{j}"] = w
            arrays[f"m{i}.codes"] = member["codes"]
            arrays[f"m{i}.feature_error"] = member["feature_error"]
            for name in ops.TREE_ARRAYS:
                if name in member:
                    arrays[f"m{i}.{name}"] = member[name]
        return meta, arrays

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
