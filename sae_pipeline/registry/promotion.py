"""The champion pair: the encoder's and its scaler's ``champion`` aliases, one writer at a time.

The two aliases are two MLflow calls, so a failure between them, or two writers (the DAG's
``promote`` and a CLI ``train`` or ``drift --retrain``) interleaving, can leave them on versions
of different runs. Two things keep them a pair:

- ``promotion_lock``: one promotion of a model at a time, so that the gate compares against the
  champion that is still there when the aliases move (no lost update). It is an advisory lock
  in one folder per deployment (``$SAE_LOCK_DIR/promote/<model>.lock``, never under a run's
  artifact root: ``lock_uri``), which every worker and the CLI share; ``flock`` on a local or
  NFS folder is released by the kernel when its holder dies. An Airflow pool would serialise
  DAG tasks only, not the CLI; a registered-model tag is no lock (MLflow has no compare-and-set).
- ``converge``: every attempt ends by pointing the scaler's alias at the scaler registered by
  the same run as the encoder behind the alias (found by the run key tag), and checks that the
  encoder alias did not move meanwhile. Whoever moves the encoder alias last also moves the
  scaler's after it, so the pair ends consistent even without the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig
from sae_pipeline.errors import RegistryError
from sae_pipeline.registry.tracking import (
    CHAMPION,
    RUN_KEY_TAG,
    alias_version,
    find_version,
    tracking_uri,
)

log = logging.getLogger(__name__)


LOCK_DIR_ENV = "SAE_LOCK_DIR"


def lock_uri(cfg: PipelineConfig, name: str) -> str:
    """Where the promotion lock of the model ``name`` lives: one place per deployment.

    ``$SAE_LOCK_DIR`` (compose: a folder on the volume every worker mounts) holds one lock per
    model name. It is never derived from a run's params: two runs naming different artifact
    roots still take the same lock. Unset (the embedded demo, one machine): a private folder in
    the system's temporary folder, one per registry (tracking URI), so that separate demos on
    one machine do not wait for each other.
    """
    import hashlib

    safe = f"{storage.run_key(name)}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    where = os.environ.get(LOCK_DIR_ENV, "").strip()
    if where:
        return storage.join(storage.normalize_root(where), "promote", f"{safe}.lock")
    registry = hashlib.sha256(tracking_uri(cfg).rstrip("/").encode()).hexdigest()[:12]
    return str(_private_tmp() / "promote" / registry / f"{safe}.lock")


def _private_tmp() -> Path:
    """``<tmp>/sae-pipeline-<uid>``, made private; refused when another user owns it."""
    path = Path(tempfile.gettempdir()) / f"sae-pipeline-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise RegistryError(f"{path} belongs to another user; set {LOCK_DIR_ENV}")
    return path


@contextlib.contextmanager
def promotion_lock(cfg: PipelineConfig, name: str):
    """Serialise promotions of the model ``name`` across tasks, workers and the CLI."""
    try:
        with storage.lock(lock_uri(cfg, name), timeout=cfg.registry.promotion_lock_timeout_s):
            yield
    except storage.LockTimeout as err:
        raise RegistryError(f"cannot promote {name}: {err}") from None


def paired_scaler(c: MlflowClient, scaler_name: str, encoder_version) -> str:
    """The scaler version registered by the same run as ``encoder_version``."""
    key = encoder_version.tags.get(RUN_KEY_TAG)
    found = find_version(c, scaler_name, key) if key else None
    if found is None:
        raise RegistryError(
            f"{encoder_version.name} version {encoder_version.version} (run key {key!r}) has no "
            f"{scaler_name} version tagged {RUN_KEY_TAG}={key!r}; register the pair again"
        )
    return str(found.version)


def converge(
    c: MlflowClient, encoder_name: str, scaler_name: str, alias: str = CHAMPION, tries: int = 5
) -> str | None:
    """Point the scaler's ``alias`` at the encoder's partner; the encoder's version (or None)."""
    for _ in range(tries):
        enc = alias_version(c, encoder_name, alias)
        if enc is None:
            return None
        want = paired_scaler(c, scaler_name, enc)
        current = alias_version(c, scaler_name, alias)
        if current is None or str(current.version) != want:
            log.warning(
                "%s@%s was on %s, not on %s (the partner of %s v%s): repaired",
                scaler_name, alias, getattr(current, "version", None), want, encoder_name,
                enc.version,
            )  # fmt: skip
            c.set_registered_model_alias(scaler_name, alias, want)
        again = alias_version(c, encoder_name, alias)
        if again is not None and str(again.version) == str(enc.version):
            return str(enc.version)
    raise RegistryError(f"{encoder_name}@{alias} keeps moving; promotion did not settle")


def set_champion(
    c: MlflowClient, encoder_name: str, encoder_version: str, scaler_name: str
) -> str | None:
    """Move both ``champion`` aliases to ``encoder_version`` and its scaler; converge."""
    c.set_registered_model_alias(encoder_name, CHAMPION, encoder_version)
    partner = paired_scaler(c, scaler_name, c.get_model_version(encoder_name, encoder_version))
    c.set_registered_model_alias(scaler_name, CHAMPION, partner)
    return converge(c, encoder_name, scaler_name)  # repairs (and warns) only if a write was lost
