"""The drift monitor's fourth signal: the share of a batch that the anomaly detector flags.

The champion's detector flags a known share of its training rows (``expected_share``, set by
``anomaly.contamination``). A batch drawn from the same distribution is flagged at about that
rate; a batch with many more flagged rows holds rows the model has not seen the like of (a new
kind of input, a broken upstream feed), even when every column's marginal looks unchanged. The
test is one-sided, because fewer anomalies than usual is no cause for retraining: a binomial
test of the count flagged against ``expected_share``, drift when its p-value is below ``alpha``
(0.001 by default: a monitor checks many batches, so false alarms must be rare).

Pure: arrays in, a result dict out, in the shape ``drift.decide`` reads for every signal.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLAGGED = "flagged_share"
FLAG_COLUMN = "is_anomaly"
DEFAULT_ALPHA = 1e-3


def flagged_share_result(
    flags: np.ndarray, expected_share: float, alpha: float | None = None
) -> dict[str, Any]:
    """One-sided binomial test of ``flags`` (bool per row) against ``expected_share``."""
    from scipy.stats import binomtest

    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    flags = np.asarray(flags, dtype=bool)
    n, k = len(flags), int(flags.sum())
    expected = float(min(max(expected_share, 1e-9), 1.0 - 1e-9))  # binomtest needs 0 < p < 1
    p_value = float(binomtest(k, n, expected, alternative="greater").pvalue) if n else 1.0
    drifted = p_value < alpha
    return {
        # decide() reads drift_share against share_threshold for every signal: this signal
        # is one "column", drifted or not.
        "drift_share": float(drifted),
        "drifted_columns": int(drifted),
        "columns": 1,
        "share_threshold": 1.0,
        "drifted": drifted,
        "top_columns": [FLAG_COLUMN] if drifted else [],
        "observed_share": k / n if n else 0.0,
        "expected_share": float(expected_share),
        "p_value": p_value,
        "alpha": alpha,
        "per_column": {
            FLAG_COLUMN: {
                "score": p_value,
                "method": "binomial",
                "threshold": alpha,
                "drifted": drifted,
            }
        },
    }


def describe(result: dict[str, Any]) -> str:
    """``flagged 3.2% vs 1.0% expected (p=2e-05)``: how ``decide`` and the summary put it."""
    return (
        f"flagged {100 * result['observed_share']:.1f}% vs "
        f"{100 * result['expected_share']:.1f}% expected (p={result['p_value']:.2g})"
    )
