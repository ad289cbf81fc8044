"""The anomaly detector's development datasets: where its defaults were chosen.

None of these is one of the six ADBench datasets the benchmark reports, so that those six
stay a test set. Synthetic data follow ADBench's four anomaly types (Han et al. 2022, sec. 4.3):
normal rows from a Gaussian mixture, anomalies that are

* ``global``: uniform over a box wider than the data;
* ``local``: the same mixture with its covariances scaled up;
* ``clustered``: the same mixture with its means shifted;
* ``dependency``: every feature drawn independently from its normal marginal (the
  relations between features are broken, each value on its own looks normal);

and real data with one class subsampled as the anomalies: scikit-learn's bundled sets, and
three that ship with the lock's statsmodels and plotly (dependencies of Evidently), so that real
data weighs as much as synthetic when defaults are chosen:

* ``anes96``: the 1996 American National Election Study, 10 numeric answers; Dole voters
  are the anomalies;
* ``gapminder``: countries' yearly life expectancy, log population and log GDP per head (and
  the year); one continent per seed is the anomalies;
* ``fair``: Fair's survey of marriages, 8 numeric answers; the respondents who report an
  affair are the anomalies (a weak signal: every method scores near chance).
"""

from __future__ import annotations

import numpy as np

SYNTHETIC = ("global", "local", "clustered", "dependency")
REAL = ("digits", "breast_cancer", "wine", "anes96", "gapminder", "fair")


def _mixture(rng, n: int, d: int, means, covs) -> np.ndarray:
    comp = rng.integers(len(means), size=n)
    return np.stack([rng.multivariate_normal(means[c], covs[c]) for c in comp])


def synthetic(kind: str, seed: int, n: int = 3000, d: int = 12, share: float = 0.05):
    """(X, y) with ``share`` anomalies of ``kind``; normal rows from a 3-component mixture."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(3, d))
    covs = []
    for _ in range(3):
        a = rng.normal(size=(d, 3))  # low-rank structure + noise: features depend on each other
        covs.append(a @ a.T + 0.1 * np.eye(d))
    n_out = int(share * n)
    normal = _mixture(rng, n - n_out, d, means, covs)
    if kind == "global":
        lo, hi = normal.min(axis=0), normal.max(axis=0)
        span = hi - lo
        odd = rng.uniform(lo - 0.1 * span, hi + 0.1 * span, size=(n_out, d))
    elif kind == "local":
        odd = _mixture(rng, n_out, d, means, [5.0 * c for c in covs])
    elif kind == "clustered":
        odd = _mixture(rng, n_out, d, means + rng.normal(scale=2.0, size=means.shape), covs)
    elif kind == "dependency":
        pool = _mixture(rng, 4 * n_out, d, means, covs)
        odd = np.stack([rng.choice(pool[:, j], size=n_out) for j in range(d)], axis=1)
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}")
    x = np.vstack([normal, odd])
    y = np.r_[np.zeros(len(normal)), np.ones(n_out)].astype(int)
    return x, y


def real(name: str, seed: int, share: float = 0.05):
    """(X, y): one class of a scikit-learn dataset, subsampled to ``share``, as anomalies."""
    from sklearn import datasets

    if name == "digits":
        x, c = datasets.load_digits(return_X_y=True)
        odd_class = seed % 10  # a different digit per seed
    elif name == "breast_cancer":
        x, c = datasets.load_breast_cancer(return_X_y=True)
        odd_class = 0  # malignant
    elif name == "wine":
        x, c = datasets.load_wine(return_X_y=True)
        odd_class = seed % 3
    elif name in ("anes96", "gapminder", "fair"):
        x, c, odd_class = _packaged(name, seed)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(c != odd_class)
    pool = np.flatnonzero(c == odd_class)
    n_out = min(len(pool), max(3, int(share * len(normal) / (1 - share))))
    odd = rng.choice(pool, size=n_out, replace=False)
    rows = np.r_[normal, odd]
    return x[rows].astype(np.float64), (c[rows] == odd_class).astype(int)


def _packaged(name: str, seed: int):
    """(features, classes, the anomalies' class) of a dataset bundled with statsmodels/plotly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "gapminder":
            import plotly.data

            d = plotly.data.gapminder()
            x = np.column_stack([d["year"], d["lifeExp"], np.log(d["pop"]), np.log(d["gdpPercap"])])
            names = sorted(d["continent"].unique())
            c = d["continent"].map({n: i for i, n in enumerate(names)}).to_numpy()
            return x.astype(np.float64), c, seed % len(names)
        import statsmodels.api as sm

        d = getattr(sm.datasets, name).load_pandas().data
    if name == "anes96":
        return d.drop(columns=["vote", "logpopul"]).to_numpy(np.float64), d["vote"].to_numpy(), 1
    c = (d["affairs"] > 0).astype(int).to_numpy()
    return d.drop(columns=["affairs"]).to_numpy(np.float64), c, 1


def load(name: str, seed: int):
    return synthetic(name, seed) if name in SYNTHETIC else real(name, seed)
