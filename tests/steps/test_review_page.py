"""What the reviewer's page links to, and the reference a reviewer's acceptance builds
(issue 23 items 6 and 8). No champion is trained: these read only the run's context."""

from __future__ import annotations

import re

import pytest

from sae_pipeline import storage
from sae_pipeline.monitoring import review as pure
from sae_pipeline.registry.champion import ModelRef
from sae_pipeline.steps import monitoring, review

RUN = "0123456789abcdef0123456789abcdef"


def _ctx(tmp_path, tracking_uri: str) -> dict:
    root = str(tmp_path / "artifacts")
    ref = ModelRef("enc", "3", "mlflow-run", "champ", tracking_uri, root)
    ctx = {
        "run_id": "scheduled__1",
        "run_key": "scheduled__1",
        "artifacts_root": root,
        "tracking_uri": tracking_uri,
        "model": ref.to_dict(),
        "batch": {"files": ["b.parquet"], "key": "batch-abc"},
    }
    return monitoring.prepare(ctx)


def _summary(ctx) -> dict:
    return {
        "mlflow_run_id": RUN,
        "report_dir": storage.join(ctx["artifacts_root"], "monitoring", "checks", "scheduled__1"),
        "drift_share": {"raw": 0.6, "codes": 0.1, "reconstruction_error": 0.0},
    }


def _anchors(body: str) -> list[str]:
    return re.findall(r"\]\(([^)]*)\)", body)


@pytest.fixture(autouse=True)
def _no_public_urls(monkeypatch):
    monkeypatch.delenv(review.MLFLOW_PUBLIC_URL, raising=False)
    monkeypatch.delenv(review.ARTIFACTS_PUBLIC_URL, raising=False)


def test_without_public_urls_the_page_names_places_and_links_nothing(tmp_path):
    """Before: ``file://`` and ``runs:/`` links, which Airflow's page renders as href=""."""
    ctx = _ctx(tmp_path, f"sqlite:///{tmp_path}/m.db")
    summary = _summary(ctx)
    links = review.report_links(ctx, summary)
    assert links == {}
    body = pure.review_body({"summary": "**retrain**"}, links, review.unlinked(ctx, summary, links))
    assert _anchors(body) == []
    assert f"`{summary['report_dir']}`" in body and f"`{RUN}`" in body
    assert review.ARTIFACTS_PUBLIC_URL in body and review.MLFLOW_PUBLIC_URL in body


def test_links_use_the_public_urls_not_the_workers(tmp_path, monkeypatch):
    """Before: under compose the links pointed at http://mlflow:5000, which a reviewer's
    browser cannot resolve."""
    monkeypatch.setenv(review.MLFLOW_PUBLIC_URL, "https://mlflow.example.org/")
    monkeypatch.setenv(review.ARTIFACTS_PUBLIC_URL, "https://files.example.org/sae")
    ctx = _ctx(tmp_path, "http://mlflow:5000")
    summary = _summary(ctx)
    links = review.report_links(ctx, summary)
    assert links["raw report"] == (
        "https://files.example.org/sae/monitoring/checks/scheduled__1/raw.html"
    )
    assert links["codes report (MLflow)"] == (
        f"https://mlflow.example.org/get-artifact?path=drift/codes.html&run_uuid={RUN}"
    )
    assert links["MLflow run"] == f"https://mlflow.example.org/#/runs/{RUN}"
    assert len(links) == 7 and review.unlinked(ctx, summary, links) == []
    for url in links.values():
        assert url.startswith("https://") and "mlflow:5000" not in url


def test_an_http_tracking_uri_is_the_fallback_and_never_a_runs_link(tmp_path):
    ctx = _ctx(tmp_path, "http://127.0.0.1:5000")
    links = review.report_links(ctx, _summary(ctx))
    assert links["MLflow run"] == f"http://127.0.0.1:5000/#/runs/{RUN}"
    assert "raw report" not in links  # no public URL for the store: named instead
    assert all(u.startswith("http://") for u in links.values())


# ---- the reference's cache key (issue 23 item 8) ---------------------------------------------
def test_every_accepted_batch_changes_the_reference_key(tmp_path):
    """Before: the last 12 characters of the joined keys; a key that sorts first left them
    unchanged, the cached reference was reused, and the accepted batch kept being flagged."""
    ctx = _ctx(tmp_path, f"sqlite:///{tmp_path}/m.db")
    one = ["batch_shifted-1613b33dec", "batch_zzz-0000000001"]
    seen = {monitoring.reference_uri(ctx, []), monitoring.reference_uri(ctx, one)}
    seen.add(monitoring.reference_uri(ctx, ["batch_aaa-ffffffffff", *one]))  # sorts first
    seen.add(monitoring.reference_uri(ctx, [*one[:1], "batch_zzz-0000000002"]))
    assert len(seen) == 4
    assert monitoring.reference_uri(ctx, one) == monitoring.reference_uri(ctx, one[::-1])


# ---- the Evidently page's heading (issue 23 item 13) ---------------------------------------
def test_the_title_and_decision_go_before_evidentlys_page():
    from sae_pipeline.monitoring.drift import report_title, titled_html

    summary = {"batch_key": "batch-<b>", "model_name": "enc", "model_version": "3"}
    title = report_title("raw", summary)
    page = '<html><head><meta charset="utf-8"></head><body>\n<div id="root_x"></div></body>'
    got = titled_html(page, title, "Decision: retrain: drift in codes")
    assert "<title>raw drift: batch batch-&lt;b&gt;, enc v3</title>" in got
    assert got.index("Decision: retrain") < got.index('<div id="root_x">')
