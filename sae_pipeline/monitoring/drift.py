"""Drift between a batch and the champion's training reference, on three signals (four with
an anomaly detector).

- ``raw``: the contract's feature columns as they arrive;
- ``codes``: the champion's codes of those rows (what downstream consumers actually use);
- ``reconstruction_error``: the champion's per-row reconstruction MSE. An autoencoder
  reconstructs rows like its training data well, so a batch whose errors are distributed
  differently is one the model does not describe.

- ``flagged_share``: when the champion has an anomaly detector, the share of rows it flags
  against the share it flagged in training (``monitoring/flagged.py``; a binomial test).

Each of the first three signals is one Evidently ``DataDriftPreset`` report (a stat test per
column, chosen by Evidently from the column's type and size unless the policy names one); its
*drift share* is
the share of the signal's columns that drifted. The policy (``DriftPolicy``) says when that
counts as drift and what to do about it; ``decide`` applies it and gives the reason in words.
Nothing here touches MLflow, Airflow or the artifact store (see ``monitoring``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_pipeline.errors import ConfigError
from sae_pipeline.monitoring.downstream import DownstreamPolicy
from sae_pipeline.monitoring.flagged import FLAG_COLUMN, FLAGGED, describe
from sae_pipeline.monitoring.review import ReviewPolicy

EVIDENTLY_SIGNALS = ("raw", "codes", "reconstruction_error")
SIGNALS = (*EVIDENTLY_SIGNALS, FLAGGED)
Signal = Literal["raw", "codes", "reconstruction_error", "flagged_share"]
Share = Annotated[float, Field(gt=0.0, le=1.0)]


class SignalPolicy(BaseModel):
    """How one signal is tested and when it counts as drifted."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    drift_share: Share | None = Field(
        None, description="Share of drifted columns that means drift; default: the policy's."
    )
    method: str | None = Field(
        None, description="Evidently stat test for every column (e.g. 'ks', 'psi', "
        "'wasserstein'); default: Evidently's choice by column type and row count.",
    )  # fmt: skip
    threshold: float | None = Field(
        None,
        description="The stat test's per-column threshold; default: the test's own "
        "(flagged_share: the binomial test's alpha, default 0.001).",
    )


class DriftPolicy(BaseModel):
    """When a batch counts as drifted, and whether that triggers retraining."""

    model_config = ConfigDict(extra="forbid")

    drift_share: Share = Field(
        0.5, description="A signal drifts when at least this share of its columns drift."
    )
    signals: dict[Signal, SignalPolicy] = Field(
        default_factory=lambda: {s: SignalPolicy() for s in SIGNALS}
    )
    min_rows: Annotated[int, Field(ge=1)] = Field(
        100, description="Batches with fewer valid rows are reported but not judged."
    )
    sample_rows: Annotated[int, Field(ge=0)] = Field(
        20_000,
        description="Rows of the batch and of the reference the tests see (a seeded uniform "
        "sample); 0 = all. The per-column tests and their plots cost time per row.",
    )
    retrain: bool = Field(True, description="Trigger retraining when drift is detected.")
    experiment: str = Field("sae-monitoring", description="MLflow experiment of the checks.")
    downstream: DownstreamPolicy = Field(
        default_factory=DownstreamPolicy, description="The champion's probe on labelled batches."
    )
    review: ReviewPolicy = Field(
        default_factory=ReviewPolicy, description="Which decisions wait for a person's review."
    )
    seed: int = 0

    def signal(self, name: str) -> SignalPolicy:
        return self.signals.get(name) or SignalPolicy()

    def share_threshold(self, name: str) -> float:
        own = self.signal(name).drift_share
        return own if own is not None else self.drift_share


def load_policy(path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """A policy from YAML (or the defaults) plus dotted overrides; ConfigError names the field."""
    from sae_pipeline.config import set_path

    data = _policy_data(path)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_path(data, key, value)
    try:
        return DriftPolicy.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "policy"
        got = first.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        raise ConfigError(f"invalid drift policy: {where}: {first['msg']}{shown}") from None


# The fields that judge a batch (drifted or not); under a deployment policy only it sets them.
JUDGING_FIELDS = ("drift_share", "signals", "min_rows", "sample_rows", "downstream", "seed")


def deployment_judges(
    deployed_path: str | Path, run_path: str | Path | None, overrides: dict[str, Any] | None
) -> DriftPolicy:
    """The run's policy (``run_path`` + ``overrides``) with the deployment's judging fields.

    A run setting that would change a judging field (``drift_share: 1.0``, a signal turned
    off, ``sample_rows: 0``...) is refused with a ConfigError naming it; setting one to the
    deployment's own value is allowed. The other fields (``retrain``, ``experiment``,
    ``review``, which the caller raises) stay the run's.
    """
    deployed = load_policy(deployed_path)
    policy = load_policy(run_path or deployed_path, overrides)
    settings = _leaves(_policy_data(run_path)) if run_path else {}
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    judged = deployed.model_dump(include=set(JUDGING_FIELDS))
    for dotted, value in settings.items():
        if dotted.split(".")[0] not in JUDGING_FIELDS:
            continue
        if (
            load_policy(deployed_path, {dotted: value}).model_dump(include=set(JUDGING_FIELDS))
            != judged
        ):
            raise ConfigError(
                f"drift policy {dotted}={value!r} refused: the deployment's policy "
                f"($SAE_DRIFT_POLICY) sets the judging fields and a run cannot change them"
            )
    return policy.model_copy(update={f: getattr(deployed, f) for f in JUDGING_FIELDS})


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (an empty section sets nothing)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _policy_data(path: str | Path | None) -> dict[str, Any]:
    """A policy file's mapping (plain JSON types), or ``{}`` for none."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"drift policy file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(
                f"drift policy {p} is not valid YAML: {err}".splitlines()[0]
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"drift policy {p} must hold a mapping, got {type(data).__name__}")
    return json.loads(json.dumps(data))


# ---- the signals ------------------------------------------------------------------------
def signal_frames(encoder, features) -> dict[str, Any]:
    """The signals of a frame of raw features, each a frame (one column per variable)."""
    import pandas as pd

    from sae_pipeline.engine.encoder import ERROR_COLUMN, encode_rows

    raw = features[encoder.contract.feature_columns].reset_index(drop=True)
    x = raw.to_numpy(dtype=np.float64)
    codes, err = encode_rows(encoder, x)
    frames = {
        "raw": raw,
        "codes": pd.DataFrame(codes, columns=encoder.code_columns),
        "reconstruction_error": pd.DataFrame({ERROR_COLUMN: err}),
    }
    if getattr(encoder, "anomaly", None) is not None:
        frames[FLAGGED] = pd.DataFrame({FLAG_COLUMN: encoder.anomaly_columns(x)[1]})
    return frames


def run_report(current, reference, policy: DriftPolicy, signal: str):
    """One Evidently drift report of ``current`` against ``reference``: (snapshot, result)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = [str(c) for c in current.columns]
    sp, share = policy.signal(signal), policy.share_threshold(signal)
    definition = DataDefinition(numerical_columns=columns)
    report = Report(
        [
            DataDriftPreset(
                columns=columns, drift_share=share, method=sp.method, threshold=sp.threshold
            )
        ],
        include_tests=True,
    )
    # Constant reference columns (blank pixels) make some tests divide by zero; Evidently
    # handles the result, the warnings are noise.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
    return snapshot, summarize_snapshot(snapshot.dict(), share)


def summarize_snapshot(snapshot: dict[str, Any], share_threshold: float) -> dict[str, Any]:
    """Drift share and per-column verdicts from an Evidently 0.7 snapshot dict."""
    share, count, columns = None, 0, {}
    for m in snapshot["metrics"]:
        cfg = m["config"]
        kind = cfg["type"].rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            share, count = float(m["value"]["share"]), int(m["value"]["count"])
        elif kind == "ValueDrift":
            columns[cfg["column"]] = {
                "score": float(m["value"]),
                "method": cfg.get("method"),
                "threshold": cfg.get("threshold"),
            }
    for t in snapshot.get("tests", []):
        params = (t.get("metric_config") or {}).get("params") or {}
        col = params.get("column")
        if t.get("id") == "drift" and col in columns:
            columns[col]["drifted"] = t["status"] == "FAIL"
    if share is None:
        raise ValueError("the Evidently snapshot has no DriftedColumnsCount metric")
    return {
        "drift_share": share,
        "drifted_columns": count,
        "columns": len(columns),
        "share_threshold": share_threshold,
        "drifted": share >= share_threshold,
        "top_columns": top_columns(columns),
        "per_column": columns,
    }


# Evidently's stat tests whose score is a p-value (smaller = more drift), by name and by the
# display name a report shows; every other known test scores a distance (larger = more drift).
P_VALUE_TESTS = {
    "ks": "K-S p_value", "chisquare": "chi-square p_value", "z": "Z-test p_value",
    "mannw": "Mann-Whitney U-rank test", "anderson": "Anderson-Darling",
    "cramer_von_mises": "Cramer-von Mises", "es": "Epps-Singleton", "t_test": "t_test",
    "fisher_exact": "Fisher's Exact test", "g_test": "g_test", "TVD": "Total-Variation-Distance",
    "empirical_mmd": "empirical_mmd",
}  # fmt: skip
DISTANCE_TESTS = {
    "wasserstein": "Wasserstein distance (normed)", "psi": "PSI", "kl_div":
    "Kullback-Leibler divergence", "jensenshannon": "Jensen-Shannon distance",
    "hellinger": "Hellinger distance", "ed": "Energy-distance",
    "perc_text_content_drift": "Percentile text content drift",
    "abs_text_content_drift": "Absolute text content drift",
}  # fmt: skip
_P_VALUE_NAMES = {*P_VALUE_TESTS, *P_VALUE_TESTS.values()}
_DISTANCE_NAMES = {*DISTANCE_TESTS, *DISTANCE_TESTS.values()}


def scores_p_values(column: dict[str, Any]) -> bool:
    """Whether a column's drift score is a p-value (small = drift) rather than a distance.

    Known by the test's name; for a test this table does not know, by its verdict: a drifted
    column scored below its threshold was judged on a p-value.
    """
    method = column.get("method") or ""
    if method in _P_VALUE_NAMES:
        return True
    if method in _DISTANCE_NAMES:
        return False
    threshold = column.get("threshold")
    return bool(column.get("drifted")) and threshold is not None and column["score"] < threshold


def top_columns(columns: dict[str, dict[str, Any]], n: int = 5) -> list[str]:
    """The drifted columns, most drifted first: smallest p-value, or largest distance."""

    def strength(item):
        _, c = item
        return c["score"] if scores_p_values(c) else -c["score"]

    drifted = [kv for kv in columns.items() if kv[1].get("drifted")]
    return [name for name, _ in sorted(drifted, key=strength)[:n]]


# ---- the decision -----------------------------------------------------------------------------
def decide(results: dict[str, dict[str, Any]], rows: int, policy: DriftPolicy) -> dict[str, Any]:
    """Drift or not, retrain or not, and why, from the per-signal results (pure)."""
    if rows < policy.min_rows:
        return {
            "drift_detected": False,
            "retrain_triggered": False,
            "decision": "not_judged",
            "reason": f"batch has {rows} valid row(s), fewer than min_rows={policy.min_rows}",
            "drifted_signals": [],
        }
    parts, drifted = [], []
    for name in SIGNALS:
        r = results.get(name)
        if r is None:
            continue
        rel = ">=" if r["drifted"] else "<"
        if "observed_share" in r:  # flagged_share: a count against its expected share
            parts.append(f"{name}: {describe(r)}")
        else:
            parts.append(f"{name} {r['drift_share']:.2f} {rel} {r['share_threshold']:.2f}")
        if r["drifted"]:
            drifted.append(name)
    shares = ", ".join(parts)
    if not drifted:
        return {
            "drift_detected": False,
            "retrain_triggered": False,
            "decision": "no_drift",
            "reason": f"no signal drifted (drift share: {shares})",
            "drifted_signals": [],
        }
    reason = f"drift in {', '.join(drifted)} (drift share: {shares})"
    if not policy.retrain:
        return {
            "drift_detected": True,
            "retrain_triggered": False,
            "decision": "drift_alert",
            "reason": f"{reason}; retraining is off in the policy",
            "drifted_signals": drifted,
        }
    return {
        "drift_detected": True,
        "retrain_triggered": True,
        "decision": "retrain",
        "reason": reason,
        "drifted_signals": drifted,
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The few lines a reviewer reads first (MLflow shows them as the run's description)."""
    lines = [
        f"**{summary['decision']}**: {summary['reason']}",
        "",
        f"- batch: `{summary['batch_key']}` ({summary['rows_valid']} valid of "
        f"{summary['rows_in']} rows; {summary['rows_tested']} tested)",
        f"- model: {summary['model_name']} v{summary['model_version']}",
    ]
    for name, r in summary["signals"].items():
        if "observed_share" in r:
            lines.append(f"- {name}: {describe(r)}")
            continue
        top = f"; most drifted: {', '.join(r['top_columns'])}" if r["top_columns"] else ""
        lines.append(
            f"- {name}: drift share {r['drift_share']:.2f} "
            f"({r['drifted_columns']}/{r['columns']} columns, threshold {r['share_threshold']:.2f})"
            f"{top}"
        )
    if summary.get("downstream"):
        lines.append(f"- downstream: {summary['downstream']['reason']}")
    if "mean_reconstruction_error" in summary:
        m = summary["mean_reconstruction_error"]
        lines.append(
            f"- mean reconstruction error: batch {m['current']:.5f}, reference {m['reference']:.5f}"
        )
    return "\n".join(lines)


def report_title(signal: str, summary: dict[str, Any]) -> str:
    """An Evidently report's title: the signal, the batch and the model version."""
    return (
        f"{signal} drift: batch {summary['batch_key']}, "
        f"{summary['model_name']} v{summary['model_version']}"
    )


def titled_html(page: str, title: str, sentence: str) -> str:
    """An Evidently HTML report with ``title`` and the decision's ``sentence`` on top.

    Evidently's own verdict ("Dataset Drift is NOT detected") concerns one signal; the
    decision may rest on others, so the page says so before anything else.
    """
    import html

    head = (
        '<header style="font-family:sans-serif;margin:16px 24px;padding:12px 16px;'
        'border:1px solid #ccc;border-radius:6px;background:#f7f7f7">'
        f'<h1 style="font-size:20px;margin:0 0 8px">{html.escape(title)}</h1>'
        f'<p style="margin:0" data-sae="decision">{html.escape(sentence)}</p>'
        '<p style="margin:6px 0 0;color:#555">The verdict below is this signal\'s alone; the '
        "decision above weighs every signal.</p></header>"
    )
    at = page.find("<body")
    if at < 0:
        return head + page
    end = page.index(">", at) + 1
    page = page[:end] + head + page[end:]
    opened = page.find("<head>")
    if 0 <= opened < at:  # the tab's title (Evidently writes none)
        opened += len("<head>")
        page = f"{page[:opened]}<title>{html.escape(title)}</title>{page[opened:]}"
    return page
