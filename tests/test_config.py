from pathlib import Path

import pytest
import yaml

from sae_pipeline.cli import main
from sae_pipeline.config import PipelineConfig, build_config, load_config
from sae_pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_digits_yaml_spells_out_the_embedded_defaults():
    assert load_config(REPO / "configs" / "digits.yaml") == PipelineConfig()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model.hidden_dims": [64, 0]}, "model.hidden_dims.1"),
        ({"model.hidden_dims": []}, "model.hidden_dims"),
        ({"model.activation": "swish"}, "model.activation"),
        ({"training.pretrain.learning_rate": -1}, "training.pretrain.learning_rate"),
        ({"training.finetune.batch_size": "big"}, "training.finetune.batch_size"),
        ({"scaler.kind": "zscore"}, "scaler.kind"),
        ({"split.test_fraction": 1.5}, "split.test_fraction"),
        ({"model.dropout": 1.0}, "model.dropout"),
        ({"model.unknown_key": 1}, "model.unknown_key"),
        ({"registry.encoder_model_name": ""}, "registry.encoder_model_name"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    message = str(err.value)
    assert "\n" not in message
    assert f"invalid config: {field}:" in message


def test_inconsistent_combinations_are_rejected():
    with pytest.raises(ConfigError, match="noise_level is 0"):
        build_config({}, {"model.noise": "masking", "model.noise_level": 0})
    with pytest.raises(ConfigError, match="leaves under 10%"):
        build_config({}, {"split.test_fraction": 0.6, "split.val_fraction": 0.35})


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_bad_config_in_one_line(capsys):
    assert main(["config", "--set", "training.finetune.epochs=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "training.finetune.epochs" in err and "-3" in err


def test_cli_prints_resolved_config(capsys):
    assert main(["config", "--set", "model.hidden_dims=[32,8]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["hidden_dims"] == [32, 8]


def test_config_hash_changes_with_content():
    assert PipelineConfig().config_hash() == PipelineConfig().config_hash()
    assert build_config({}, {"training.seed": 1}).config_hash() != PipelineConfig().config_hash()


@pytest.mark.parametrize("path", ["", "  "])
def test_empty_config_path_is_the_embedded_defaults(path):
    assert load_config(path) == load_config(None)


# ---- one source of defaults: an override changes what it names and nothing else --------------
def _leaves(model) -> dict:
    from sae_pipeline.config import _flatten

    return dict(_flatten(model))


# Another valid value where the type alone does not say; the rest are derived by type.
_OTHER_VALUES = {
    "data.format": "csv",
    "data.query": "select 1",
    "model.noise": "masking",
    "model.sparsity_weight": 0.5,
    "model.code_activation": "tanh",
    "registry.tracking_uri": "sqlite:///elsewhere.db",
    "selection.candidates": [{"model.hidden_dims": [32, 16, 4]}],
    "data.feature_columns": ["x1"],
}
# Fields valid only together with another: overridden as a pair, and only the pair may change.
_PARTNERS = {"model.sparsity": {"model.sparsity": "l1", "model.sparsity_weight": 0.5}}


def _another_value(key: str, value):
    """A valid value for ``key`` other than its default ``value``."""
    from typing import get_args

    if key in _OTHER_VALUES:
        return _OTHER_VALUES[key]
    section, _, leaf = key.rpartition(".")
    model = PipelineConfig()
    for part in section.split(".") if section else []:
        model = getattr(model, part)
    annotation = type(model).model_fields[leaf].annotation
    choices = [c for c in get_args(annotation) if isinstance(c, str)]
    if isinstance(value, bool):
        return not value
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return f"{value}-other"
    if isinstance(value, list):
        return [v * 2 for v in value] if value else ["x1"]
    assert value is None, key
    return {"int": 7, "str": "other"}.get(
        next(t.__name__ for t in get_args(annotation) if t is not type(None)), 7
    )


def _all_leaves() -> list[tuple[str, object]]:
    return list(_leaves(PipelineConfig()).items())


@pytest.mark.parametrize(("key", "default"), _all_leaves(), ids=[k for k, _ in _all_leaves()])
def test_an_override_changes_that_field_and_nothing_else(key, default):
    overrides = _PARTNERS.get(key) or {key: _another_value(key, default)}
    before = _leaves(PipelineConfig())
    for cfg in (build_config({}, overrides), _nested(overrides)):
        after = _leaves(cfg)
        changed = {k for k in before if after[k] != before[k]}
        assert changed == set(overrides), f"overriding {key} changed {sorted(changed)}"


def _nested(overrides: dict) -> PipelineConfig:
    """The same overrides written as a YAML file would: ``{training: {finetune: {...}}}``."""
    data: dict = {}
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build_config(data)


def test_a_partial_phase_keeps_the_documented_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  finetune:\n    epochs: 30\n  pretrain:\n    epochs: 3\n")
    loaded = load_config(cfg)
    assert loaded.training.finetune.learning_rate == 0.002
    assert loaded.training.finetune.lr_schedule == "cosine"
    assert loaded.training.pretrain.learning_rate == 0.003


def test_section_defaults_are_the_sections_own_field_defaults():
    """A section's default is its class built with no arguments: the field defaults are the one
    place a default lives (a ``Section(x=...)`` default is lost on the first partial override)."""
    from pydantic import BaseModel

    def walk(model_cls):
        for name, field in model_cls.model_fields.items():
            if isinstance(field.default, BaseModel):
                assert field.default == type(field.default)(), f"{model_cls.__name__}.{name}"
                walk(type(field.default))

    walk(PipelineConfig)


def test_a_null_override_is_refused_rather_than_ignored(capsys):
    """``--set data.label_column=null`` would leave ``target`` silently (None means unset)."""
    assert main(["config", "--set", "data.label_column=null"]) == 2
    err = capsys.readouterr().err
    assert "data.label_column" in err and "YAML config" in err and err.strip().count("\n") == 0
