"""Registration and promotion converge: a failure at any point between their MLflow calls,
then a retry, leaves one version of each model and both aliases on the same pair.

A real SQLite MLflow store; every MlflowClient method that writes (what the fluent API uses
underneath too) is wrapped so that the k-th write takes effect and then raises, as a server
that applied a request but whose answer was lost would; the test does that for every k.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from sae_pipeline import storage
from sae_pipeline.data.contract import Contract
from sae_pipeline.data.scaling import fit_scaler
from sae_pipeline.engine.encoder import Encoder
from sae_pipeline.engine.net import Architecture, build_net
from sae_pipeline.errors import RegistryError
from sae_pipeline.registry import promotion, tracking
from sae_pipeline.steps import training as steps

FEATURES = [f"x{i}" for i in range(4)]
WRITES = re.compile(r"^_?(create|set|log|update|delete|finalize|rename|copy|transition)")


class Injected(Exception):
    pass


class FailOnce:
    """Make the ``fail_at``-th write through MlflowClient, while armed, raise after it took
    effect; ``writes`` counts the armed writes."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.writes, self.fail_at, self.fired, self.armed = 0, fail_at, False, False
        for name in dir(MlflowClient):
            method = getattr(MlflowClient, name)
            if WRITES.match(name) and callable(method):
                monkeypatch.setattr(MlflowClient, name, self._wrap(method))

    def _wrap(self, method):
        def wrapper(*args, **kwargs):
            result = method(*args, **kwargs)
            if self.armed:
                self.writes += 1
                if self.writes == self.fail_at and not self.fired:
                    self.fired = True
                    raise Injected(f"write {self.writes} ({method.__name__}) lost its answer")
            return result

        return wrapper


def retried(step, tries: int = 3):
    """A task with retries: the step again after an injected failure."""
    for _ in range(tries - 1):
        try:
            return step()
        except Injected:
            pass
    return step()


@pytest.fixture(scope="module")
def encoder():
    rng = np.random.default_rng(0)
    contract = Contract(FEATURES, dict.fromkeys(FEATURES, "float64"), None, None)
    scaler = fit_scaler("minmax", rng.normal(size=(50, len(FEATURES))))
    return Encoder(contract, scaler, build_net(Architecture(len(FEATURES), [3, 2]), seed=0))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # SQLite commits on a RAM disk where there is one: this test makes thousands of them.
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("p")
    yield {
        "artifacts_root": str(tmp / "artifacts"),
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    shutil.rmtree(tmp, ignore_errors=True)


def _names(tag: str) -> dict[str, str]:
    return {
        "registry.encoder_model_name": f"enc-{tag}",
        "registry.scaler_model_name": f"sc-{tag}",
    }


def _round(store, encoder, tag: str, r: int, injector: FailOnce | None = None) -> dict:
    """Run ``r`` of the models ``tag``: register a pair and promote it (the gate says yes),
    each step retried after an injected failure; only these two steps are armed."""
    example = pd.DataFrame(np.zeros((3, len(FEATURES))), columns=FEATURES)
    ctx = steps.prepare(f"manual__{tag}_{r}", None, {**store, **_names(tag)})
    storage.write_json(steps._uri(ctx, "evaluate", "metrics.json"), {"test_mse": 1.0})
    cfg = steps.config_of(ctx)
    if injector is not None:
        injector.armed = True
    try:
        versions = retried(
            lambda: tracking.register_encoder(
                cfg, ctx["mlflow_run_id"], ctx["run_key"], encoder, example, {}
            )
        )
        registered = {
            "encoder_model_name": cfg.registry.encoder_model_name,
            "scaler_model_name": cfg.registry.scaler_model_name,
            "encoder_version": versions["encoder"],
            "scaler_version": versions["scaler"],
        }
        return retried(lambda: steps.promote(ctx, registered))
    finally:
        if injector is not None:
            injector.armed = False


def _assert_one_pair_per_run(store, tag: str, rounds: int) -> None:
    """Each run registered one version of each model; both aliases are on the last run's."""
    c = MlflowClient(store["registry.tracking_uri"])
    names = _names(tag)
    for name in names.values():
        versions = c.search_model_versions(f"name = '{name}'")
        keys = sorted(v.tags.get(tracking.RUN_KEY_TAG) for v in versions)
        assert keys == sorted(f"manual__{tag}_{r}" for r in range(rounds)), (name, keys)
    last = f"manual__{tag}_{rounds - 1}"
    for alias in ("challenger", "champion"):
        pair = [
            c.get_model_version_by_alias(n, alias).tags[tracking.RUN_KEY_TAG]
            for n in names.values()
        ]
        assert pair == [last, last], alias


@pytest.fixture
def better_challenger(monkeypatch):
    """The gate's comparison, stubbed: the newer version is always better."""
    monkeypatch.setattr(
        steps,
        "_common_evaluation",
        lambda ctx, cfg, name, version: ({"test_mse": 0.1}, {"test_mse": 0.2}, "stub"),
    )


def test_register_and_promote_converge_after_a_failure_at_any_write(
    store, encoder, monkeypatch, better_challenger
):
    counter = FailOnce(monkeypatch)
    assert _round(store, encoder, "count", 0, counter)["promoted"]
    first = counter.writes  # the first promotion: no champion yet
    counter.writes = 0
    assert _round(store, encoder, "count", 1, counter)["promoted"]
    later = counter.writes  # a promotion over a champion
    assert first >= 10 and later >= 10, (first, later)
    for k in range(1, first + 1):
        with monkeypatch.context() as m:
            injected = FailOnce(m, k)
            _round(store, encoder, f"first{k}", 0, injected)
            assert injected.fired, k
        _assert_one_pair_per_run(store, f"first{k}", 1)
    _round(store, encoder, "later", 0)
    for k in range(1, later + 1):  # one model, a new challenger over the champion each time
        with monkeypatch.context() as m:
            injected = FailOnce(m, k)
            _round(store, encoder, "later", k, injected)
            assert injected.fired, k
        _assert_one_pair_per_run(store, "later", k + 1)


def test_promote_repairs_a_pair_another_writer_left_split(
    store, encoder, monkeypatch, better_challenger
):
    _round(store, encoder, "split", 0)
    _round(store, encoder, "split", 1)
    c = MlflowClient(store["registry.tracking_uri"])
    names = _names("split")
    # Another writer moved only the scaler (its second call never came).
    c.set_registered_model_alias(names["registry.scaler_model_name"], "champion", "1")
    cfg = steps.config_of(steps.prepare("manual__split_0", None, {**store, **names}))
    assert promotion.converge(tracking.client(cfg), *names.values()) == "2"
    _assert_one_pair_per_run(store, "split", 2)


def test_promotions_of_one_model_wait_for_each_other(store):
    cfg = steps.config_of(
        steps.prepare("manual__lock", None, {**store, "registry.promotion_lock_timeout_s": 0.5})
    )
    held, release = threading.Event(), threading.Event()

    def holder():
        with promotion.promotion_lock(cfg, "m"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    try:
        with (
            pytest.raises(RegistryError, match="cannot promote m"),
            promotion.promotion_lock(cfg, "m"),
        ):
            pass
        with promotion.promotion_lock(cfg, "other"):  # another model is not blocked
            pass
    finally:
        release.set()
        t.join()
    with promotion.promotion_lock(cfg, "m"):  # free again
        pass


# ---- the gate's rule does not change on errors ---------------------------------------------
def _challenger_over_champion(store, encoder, tag, monkeypatch):
    """A champion (run 0) and a registered challenger (run 1): (ctx, registered) of run 1."""
    monkeypatch.setattr(steps, "load_encoder", lambda ctx: encoder)
    _round(store, encoder, tag, 0)
    example = pd.DataFrame(np.zeros((3, len(FEATURES))), columns=FEATURES)
    ctx = steps.prepare(f"manual__{tag}_1", None, {**store, **_names(tag)})
    storage.write_json(steps._uri(ctx, "evaluate", "metrics.json"), {"test_mse": 1e-9})
    cfg = steps.config_of(ctx)
    versions = tracking.register_encoder(
        cfg, ctx["mlflow_run_id"], ctx["run_key"], encoder, example, {}
    )
    return ctx, {
        "encoder_model_name": cfg.registry.encoder_model_name,
        "scaler_model_name": cfg.registry.scaler_model_name,
        "encoder_version": versions["encoder"],
        "scaler_version": versions["scaler"],
    }


def _champion_run_key(store, tag):
    c = MlflowClient(store["registry.tracking_uri"])
    return [
        c.get_model_version_by_alias(n, "champion").tags[tracking.RUN_KEY_TAG]
        for n in _names(tag).values()
    ]


@pytest.mark.parametrize(
    "error",
    [
        __import__("mlflow").exceptions.MlflowException("503 Service Unavailable"),
        OSError("connection reset"),
    ],
)
def test_a_champion_that_cannot_be_loaded_fails_the_task_not_the_rule(
    store, encoder, monkeypatch, error
):
    from sae_pipeline.registry import gate

    tag = f"unloadable-{type(error).__name__}"
    ctx, registered = _challenger_over_champion(store, encoder, tag, monkeypatch)

    def unloadable(*args):
        raise error

    monkeypatch.setattr(gate, "registered_encoder", unloadable)
    # The recorded test_mse (1e-9) would win on the old fallback; the task must fail instead.
    with pytest.raises(type(error)):
        steps.promote(ctx, registered)
    assert _champion_run_key(store, tag) == [f"manual__{tag}_0"] * 2


def test_a_champion_with_other_columns_is_not_compared_on_recorded_numbers(
    store, encoder, monkeypatch
):
    from sae_pipeline.registry import gate

    ctx, registered = _challenger_over_champion(store, encoder, "columns", monkeypatch)
    other = Contract(["y0", "y1", "y2", "y3"], dict.fromkeys(["y0", "y1", "y2", "y3"], "float64"))
    champion = Encoder(other, encoder.scaler, encoder.net)
    monkeypatch.setattr(gate, "registered_encoder", lambda *args: champion)
    result = steps.promote(ctx, registered)
    assert result["promoted"] is False
    assert result["reason"] == "needs review: champion reads other columns"
    assert _champion_run_key(store, "columns") == ["manual__columns_0"] * 2
    c = MlflowClient(store["registry.tracking_uri"])
    version = c.get_model_version("enc-columns", registered["encoder_version"])
    assert version.tags["sae.gate.decision"] == "rejected"
