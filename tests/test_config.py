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
