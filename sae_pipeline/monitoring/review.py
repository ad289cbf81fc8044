"""A person's review of a drift decision: when one is needed, what they read, what follows.

The drift policy's ``review`` section (``ReviewPolicy``) says, per decision (``retrain``,
``drift_alert``), whether the monitor acts by itself (``auto``) or stops for a person
(``required``). The reviewer reads the check's summary with links to the Evidently reports and
the MLflow run, and picks one of ``CHOICES``:

- ``retrain``: retrain on the champion's data plus the batch (the gate still decides);
- ``accept``: the batch is the new normal: nothing is retrained, and the batch joins the
  champion's reference, so batches like it no longer count as drift;
- ``dismiss``: nothing is retrained and the reference stays as it was.

An unanswered review takes ``default`` after ``timeout_hours``. Pure: nothing here touches
Airflow, MLflow or the artifact store (``sae_pipeline.steps.review`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CHOICES = ("retrain", "accept", "dismiss")
Choice = Literal["retrain", "accept", "dismiss"]
Mode = Literal["auto", "required"]
REVIEWED_DECISIONS = ("retrain", "drift_alert")

# Tags on the monitoring run and, when retraining follows, on the new model version.
TAG_CHOICE, TAG_BY, TAG_AT = "sae.review.choice", "sae.review.by", "sae.review.at"
AUTO_REVIEWER = "policy (review: auto)"


class ReviewPolicy(BaseModel):
    """Which decisions wait for a person, and what an unanswered review becomes."""

    model_config = ConfigDict(extra="forbid")

    retrain: Mode = Field("auto", description="Drift with retraining on: act, or ask a person.")
    drift_alert: Mode = Field("auto", description="Drift with retraining off: report, or ask.")
    default: Choice = Field("dismiss", description="The choice taken when nobody answers.")
    timeout_hours: Annotated[float, Field(gt=0)] = Field(
        24.0, description="How long a review waits for an answer."
    )

    def required(self, decision: str) -> bool:
        """Whether ``decision`` waits for a person."""
        return decision in REVIEWED_DECISIONS and getattr(self, decision) == "required"

    def raised_by(self, run: ReviewPolicy) -> ReviewPolicy:
        """This (the deployment's) policy, with what ``run`` requires required too.

        A run can ask for more review, never less: its ``auto`` leaves a ``required`` as it
        is, and the default and timeout stay the deployment's (a run's ``default: retrain``
        with a short timeout would be ``auto`` by another name).
        """
        modes = {d: "required" for d in REVIEWED_DECISIONS if run.required(d)}
        return self.model_copy(update=modes)


def auto_choice(decision: str) -> Choice | None:
    """What the policy does without a person: retrain on ``retrain``, nothing otherwise."""
    return "retrain" if decision == "retrain" else None


def review_body(summary: dict[str, Any], links: dict[str, str], notes: Sequence[str] = ()) -> str:
    """The reviewer's page: the check's summary, a link per report and to the MLflow run, and
    ``notes`` (the retraining data; reports that no public URL links)."""
    lines = [summary["summary"], "", "**Reports**", ""]
    lines += [f"- [{name}]({url})" for name, url in links.items()]
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "**Choices**: `retrain` (the gate still decides), `accept` (the batch becomes the new "
        "normal, nothing retrained), `dismiss` (nothing retrained, reference unchanged).",
    ]
    return "\n".join(lines)


def retraining_note(info: dict[str, Any]) -> str:
    """One line on what a retraining would train on (``_retraining.write_training_data``)."""
    rows = info["rows"]
    superseded = rows.get("superseded", 0)
    again = f", {superseded} replaced by the batch's rows with the same id" if superseded else ""
    return (
        f"retraining data, checked: {rows['champion']} champion row(s){again}, plus "
        f"{rows['batch']} batch row(s)"
    )


def review_subject(summary: dict[str, Any]) -> str:
    return (
        f"Drift review: {summary['decision']} on batch {summary['batch_key']} "
        f"({summary['model_name']} v{summary['model_version']})"
    )


def outcome(summary: dict[str, Any], choice: str | None, by: str, at: str) -> dict[str, Any]:
    """The check's summary after the review: what is triggered and the review's record."""
    if choice is not None and choice not in CHOICES:
        raise ValueError(f"review choice {choice!r} is not one of {CHOICES}")
    return {
        **summary,
        "retrain_triggered": choice == "retrain",
        "review": {"choice": choice, "by": by, "at": at},
    }


def review_tags(review: dict[str, Any] | None) -> dict[str, str]:
    """The review's record as MLflow tags (empty when there was nothing to decide)."""
    if not review or review.get("choice") is None:
        return {}
    return {TAG_CHOICE: review["choice"], TAG_BY: review["by"], TAG_AT: review["at"]}
