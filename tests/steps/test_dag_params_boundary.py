"""A trigger's run id names a place too: it becomes the run's folder under ``<root>/runs``.

Airflow accepts any run id matching ``^[A-Za-z0-9_.~:+-]+$`` (``allowed_run_id_pattern``),
``..`` included; the run's folder must still be its own, under ``<root>/runs``.
"""

from __future__ import annotations

from pathlib import Path

from sae_pipeline import storage


def test_a_dot_run_id_writes_into_its_own_run_folder(tmp_path):
    from sae_pipeline.steps import training as steps

    root = tmp_path / "artifacts"
    params = {"artifacts_root": str(root), "registry.tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    dirs = []
    for run_id in ("..", "."):
        ctx = steps.prepare(run_id, None, params)
        dirs.append(Path(ctx["run_dir"]))
    assert [d.parent for d in dirs] == [root / "runs", root / "runs"]
    assert dirs[0] != dirs[1]
    assert sorted(p.name for p in root.iterdir()) == ["runs"]  # no config.json at the root
    assert all((d / "config.json").is_file() for d in dirs)


def test_run_keys_never_name_a_dot_segment():
    for run_id in (".", "..", "...", "_..", "..__", "manual__.."):
        key = storage.run_key(run_id)
        assert key.strip(".") and "/" not in key, (run_id, key)
    assert storage.run_key("..") != storage.run_key("run")  # no other id shares that folder
    # Ordinary ids keep their keys (their runs' folders are found again).
    ordinary = "manual__2026-01-01T00:00:00+00:00"
    assert storage.run_key(ordinary) == "manual__2026-01-01T00_00_00_00_00"


def test_a_batch_size_that_would_hold_the_whole_data_is_refused_before_any_write(tmp_path):
    """The training DAG's ``batch_size`` param sizes the streamed shuffle buffer (memory)."""
    import pytest

    from sae_pipeline.errors import ConfigError
    from sae_pipeline.steps import training as steps

    root = tmp_path / "artifacts"
    params = {"artifacts_root": str(root), "registry.tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    for field in ("training.pretrain.batch_size", "training.finetune.batch_size"):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
            steps.prepare("manual__big", None, {**params, field: 10**9})
        assert "\n" not in str(err.value)
    assert not root.exists() and not (tmp_path / "m.db").exists()
    ctx = steps.prepare("manual__ok", None, {**params, "training.finetune.batch_size": 65_536})
    assert steps.config_of(ctx).training.finetune.batch_size == 65_536
