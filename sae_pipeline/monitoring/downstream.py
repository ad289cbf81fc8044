"""Downstream quality: the champion's registered probe, scored on a labelled batch's codes.

Drift in the inputs or the codes does not say whether the models that consume the codes still
work. When a batch carries the label column, the probe that travels with the champion (a
logistic regression on its codes, as plain coefficients in ``encoder.json``) is scored on the
batch; a drop from its test accuracy beyond the policy's ``max_drop`` is a signal of its own,
beside raw, codes and reconstruction error. Pure: nothing here reads files or MLflow.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class DownstreamPolicy(BaseModel):
    """When the probe's accuracy on a labelled batch counts as a drop."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_drop: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.1, description="Accuracy below the probe's test accuracy by more than this: a signal."
    )
    min_labelled: Annotated[int, Field(ge=1)] = Field(
        50, description="Fewer labelled rows: the probe is not scored."
    )


def judge(accuracy: float, reference: float, rows: int, policy: DownstreamPolicy) -> dict:
    """The downstream signal's result: accuracies, drop, whether it fired, in words."""
    if rows < policy.min_labelled:
        return {"judged": False, "fired": False, "rows": rows,
                "reason": f"{rows} labelled row(s), fewer than {policy.min_labelled}"}  # fmt: skip
    drop = reference - accuracy
    fired = drop > policy.max_drop
    rel = ">" if fired else "<="
    return {
        "judged": True,
        "fired": fired,
        "rows": rows,
        "accuracy": accuracy,
        "reference_accuracy": reference,
        "drop": drop,
        "reason": f"probe accuracy {accuracy:.3f} vs {reference:.3f} at training "
        f"(drop {drop:.3f} {rel} {policy.max_drop:.3f})",
    }


def combine(decision: dict[str, Any], downstream: dict[str, Any] | None, retrain: bool) -> dict:
    """The check's decision with the downstream signal beside the drift signals."""
    if not downstream or not downstream.get("fired") or decision["decision"] == "not_judged":
        return decision
    drifted = [*decision["drifted_signals"], "downstream"]
    if decision["drift_detected"]:
        reason = f"{decision['reason']}; downstream: {downstream['reason']}"
    else:
        reason = f"downstream quality dropped: {downstream['reason']}"
    return {
        **decision,
        "drift_detected": True,
        "retrain_triggered": retrain,
        "decision": "retrain" if retrain else "drift_alert",
        "reason": reason if retrain else f"{reason}; retraining is off in the policy",
        "drifted_signals": drifted,
    }
