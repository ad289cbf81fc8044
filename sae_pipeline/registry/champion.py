"""A registered encoder version and what it was trained on, found through the registry.

The registry knows a version's training run: the version carries the tags ``sae.run_key`` and
``sae.mlflow_run_id``, and the run's ``artifacts_root`` param says where that run kept its
artifacts (``<root>/runs/<run key>/``). From there come the training snapshot, the split and
the resolved config: everything batch encoding, drift monitoring and retraining need.

Consumers pin a version once (``resolve``) and pass the small ``ModelRef`` dict along, so that
every task of a DAG run uses the same version even if the alias moves in the meantime.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from typing import Any

from sae_pipeline import boundary, storage
from sae_pipeline.config import PipelineConfig
from sae_pipeline.errors import ConfigError, RegistryError

log = logging.getLogger(__name__)

MLFLOW_RUN_TAG = "sae.mlflow_run_id"


@dataclass(frozen=True)
class ModelRef:
    """One registered encoder version and where its training run's artifacts are."""

    name: str
    version: str
    mlflow_run_id: str
    run_key: str
    tracking_uri: str
    artifacts_root: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def run_dir(self) -> str:
        return storage.run_dir(self.artifacts_root, self.run_key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRef:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def resolve(cfg: PipelineConfig, alias: str = "champion", version: str | None = None) -> ModelRef:
    """Pin the encoder version behind ``alias`` (or the given ``version``) of the config's model."""
    import mlflow

    from sae_pipeline.registry import tracking

    c = tracking.client(cfg)
    name = cfg.registry.encoder_model_name
    if version is not None:
        try:
            v = c.get_model_version(name, str(version))
        except mlflow.exceptions.MlflowException:
            raise RegistryError(f"model {name!r} has no version {version}") from None
    else:
        v = tracking.alias_version(c, name, alias)
        if v is None:
            raise RegistryError(
                f"model {name!r} has no version with alias {alias!r} in {c.tracking_uri}; "
                "train one with the sae_training DAG first"
            )
    run_key = v.tags.get(tracking.RUN_KEY_TAG)
    if not run_key:
        raise RegistryError(
            f"{name} version {v.version} lacks the tag {tracking.RUN_KEY_TAG}: it was not "
            "registered by this pipeline, so its training data cannot be found"
        )
    run_id = v.tags.get(MLFLOW_RUN_TAG) or v.run_id
    # The run's own record of where its artifacts went beats today's config. Tags and params
    # are anyone's with write access to the registry: both pass the boundary before any read.
    root = c.get_run(run_id).data.params.get("artifacts_root") or cfg.artifacts_root
    where = f"{name} version {v.version}"
    if storage.run_key(run_key) != run_key or not run_key.strip("."):
        raise RegistryError(f"{where}: its tag {tracking.RUN_KEY_TAG}={run_key!r} is no run key")
    try:
        root = boundary.artifact_location(root, f"the artifacts_root of {where}'s run")
    except ConfigError as err:
        raise RegistryError(str(err)) from None
    return ModelRef(
        name=name,
        version=str(v.version),
        mlflow_run_id=run_id,
        run_key=run_key,
        tracking_uri=c.tracking_uri,
        artifacts_root=storage.normalize_root(root),
    )


@functools.lru_cache(maxsize=4)
def _load(tracking_uri: str, model_uri: str):
    import mlflow

    from sae_pipeline.registry import bundle

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return bundle.load_encoder(model_uri, tracking_uri)


def load_encoder(ref: ModelRef):
    """The version's ``Encoder`` (contract, scaler, network) rebuilt from its bundle files
    (JSON + npz, no pickle); cached per process."""
    return _load(ref.tracking_uri, ref.model_uri)


@functools.lru_cache(maxsize=8)
def _probe(tracking_uri: str, model_uri: str):
    import mlflow

    from sae_pipeline.registry import bundle

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return bundle.encoder_json(model_uri, tracking_uri).get("probe")


def probe(ref: ModelRef) -> dict[str, Any] | None:
    """The probe registered with the version (plain coefficients on its codes), if any."""
    return _probe(ref.tracking_uri, ref.model_uri)


def snapshot_dir(ref: ModelRef) -> str:
    """The training run's snapshot folder (``validate/``: manifest, accepted rows, contract)."""
    return storage.join(ref.run_dir, "validate")


def validate_manifest(ref: ModelRef) -> dict[str, Any]:
    """The manifest of the version's training snapshot (counts, contract, files)."""
    from sae_pipeline.data.snapshot import read_manifest

    return read_manifest(snapshot_dir(ref))


def training_snapshot(ref: ModelRef):
    """The accepted rows the version was trained (and evaluated) on, as a frame."""
    from sae_pipeline.data.snapshot import read_snapshot

    return read_snapshot(snapshot_dir(ref))


def split_indices(ref: ModelRef) -> dict[str, Any] | None:
    """The train/val/test row indices of the training snapshot, when the split is stored."""
    uri = storage.join(ref.run_dir, "split", "indices.npz")
    return storage.read_arrays(uri) if storage.exists(uri) else None


def config_uri(ref: ModelRef) -> str:
    """The resolved config the version was trained with (JSON, which YAML readers accept)."""
    return storage.join(ref.run_dir, "config.json")


def reference_rows(ref: ModelRef, features: list[str], n: int | None, seed: int):
    """(raw features float64, held-out mask) of the rows the drift reference is built from.

    ``n`` rows (every row when None or 0) of the version's training snapshot, with whether
    each was held out (its run's validation or test part). A run that streamed its training
    (``split/plan.json`` in stream mode) gets a seeded sample found from row positions alone
    and read row group by row group, so the reference's cost is O(n), whatever the snapshot's
    size; an in-memory run (small data) is read whole and sampled as before.
    """
    import numpy as np

    from sae_pipeline.data import parts

    plan_uri = storage.join(ref.run_dir, "split", "plan.json")
    plan = storage.read_json(plan_uri) if storage.exists(plan_uri) else {"mode": "memory"}
    if plan["mode"] == "stream":
        units = parts.units(parts.snapshot_files(snapshot_dir(ref), validate_manifest(ref)))
        total = sum(u.rows for u in units)
        positions = parts.sample_positions(total, n or total, seed)
        split = parts.HashSplit(**{k: v for k, v in plan["split"].items() if k != "method"})
        heldout = split.parts_of(positions.astype(np.uint64)) != 0
        return parts.read_positions(units, features, positions), heldout
    snapshot = training_snapshot(ref)
    split = split_indices(ref)
    heldout = np.zeros(len(snapshot), dtype=bool)
    if split is not None:
        heldout[np.concatenate([split["val"], split["test"]])] = True
    else:
        heldout[:] = True  # no split stored: the best available is every row
    keep = np.arange(len(snapshot))
    if n and len(snapshot) > n:
        keep = np.sort(np.random.default_rng(seed).choice(len(snapshot), n, replace=False))
    return snapshot[features].to_numpy(dtype=np.float64)[keep], heldout[keep]
