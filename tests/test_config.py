"""The configuration hierarchy, the shipped YAML files and every kind of bad configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_training.config import Config, load_config, parse_duration
from llm_training.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "config").glob("*.yaml"))


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_any_file(tmp_path):
    cfg = load_config(environ={}, default_file=tmp_path / "absent.yaml")
    assert cfg == Config()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_yaml_loads(name):
    path = REPO / "config" / f"{name}.yaml"
    cfg = load_config(path, environ={}, default_file=REPO / "config" / "default.yaml")
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, int) and got == float(value)), (section, key)


def test_default_yaml_matches_builtin_defaults():
    """config/default.yaml documents the built-in defaults: loading it changes nothing."""
    cfg = load_config(REPO / "config" / "default.yaml", environ={}, default_file=None)
    assert cfg == Config()


def test_guide_templates_have_the_guide_values():
    small = load_config(REPO / "config" / "small_model.yaml", environ={}, default_file=None)
    assert (small.model.num_layers, small.model.hidden_size, small.model.num_attention_heads) == (6, 512, 8)
    assert (small.training.batch_size, small.training.num_epochs, small.training.learning_rate) == (
        64,
        5,
        0.001,
    )
    large = load_config(REPO / "config" / "large_model.yaml", environ={}, default_file=None)
    assert (
        large.training.mixed_precision is True
        and large.resources.gpu_count == 8
        and large.resources.distributed
    )
    dist = load_config(REPO / "config" / "distributed.yaml", environ={}, default_file=None)
    assert dist.resources.distributed_backend == "nccl" and dist.training.gradient_accumulation_steps == 16


def test_hierarchy_each_layer_overrides_the_one_below(tmp_path):
    default = write(
        tmp_path / "config" / "default.yaml",
        {"training": {"batch_size": 2, "learning_rate": 0.1, "num_epochs": 3, "seed": 5, "warmup_steps": 7}},
    )
    chosen = write(
        tmp_path / "exp.yaml",
        {"training": {"learning_rate": 0.2, "num_epochs": 4, "seed": 6, "warmup_steps": 8}},
    )
    env = {
        "LLM_TRAINING__TRAINING__NUM_EPOCHS": "9",
        "LLM_TRAINING__TRAINING__SEED": "11",
        "LLM_TRAINING__TRAINING__WARMUP_STEPS": "12",
    }
    cfg = load_config(
        chosen,
        environ=env,
        cli={"training.seed": 13, "training.warmup_steps": 14},
        overrides={"training.warmup_steps": 15},
        default_file=default,
    )
    t = cfg.training
    assert t.gradient_accumulation_steps == 1  # hard-coded default
    assert t.batch_size == 2  # config/default.yaml
    assert t.learning_rate == 0.2  # --config file
    assert t.num_epochs == 9  # environment
    assert t.seed == 13  # command line
    assert t.warmup_steps == 15  # runtime override
    cfg.update("training", "learning_rate", 0.5)
    assert cfg.get("training", "learning_rate") == 0.5


def test_preset_sits_below_files(tmp_path):
    chosen = write(tmp_path / "c.yaml", {"training": {"max_time": "5s"}})
    assert (
        load_config(preset={"training.max_time": "9s"}, environ={}, default_file=None).training.max_time
        == "9s"
    )
    assert (
        load_config(
            chosen, preset={"training.max_time": "9s"}, environ={}, default_file=None
        ).training.max_time
        == "5s"
    )


def test_exponent_numbers_from_yaml_and_flags(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("training:\n  learning_rate: 6e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(path, environ={}, default_file=None).training.learning_rate == 6e-4
    assert (
        load_config(
            cli={"training.learning_rate": "3E-5"}, environ={}, default_file=None
        ).training.learning_rate
        == 3e-5
    )


def test_environment_values_are_typed_and_log_level_honoured():
    cfg = load_config(
        environ={
            "LLM_TRAINING__MODEL__DROPOUT": "0.1",
            "LLM_TRAINING__RESOURCES__DISTRIBUTED": "true",
            "LOG_LEVEL": "DEBUG",
        },
        default_file=None,
    )
    assert cfg.model.dropout == 0.1 and cfg.resources.distributed is True and cfg.logging.level == "DEBUG"


def test_unknown_key_names_the_closest(tmp_path):
    bad = write(tmp_path / "bad.yaml", {"training": {"learnin_rate": 0.1}})
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: unknown key 'training.learnin_rate' \(did you mean 'training.learning_rate'\?\)",
    ):
        load_config(bad, environ={}, default_file=None)
    with pytest.raises(ConfigError, match="unknown section 'trainig'.*did you mean 'training'"):
        load_config(cli={"trainig.batch_size": 2}, environ={}, default_file=None)
    with pytest.raises(ConfigError, match="environment: unknown key 'model.num_layer'.*num_layers"):
        load_config(environ={"LLM_TRAINING__MODEL__NUM_LAYER": "2"}, default_file=None)


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"training.batch_size": "lots"}, "'training.batch_size' expects an integer or 'auto', got 'lots'"),
        ({"training.learning_rate": True}, "'training.learning_rate' expects a number"),
        ({"training.learning_rate": -0.001}, "training.learning_rate must be positive"),
        (
            {"model.num_attention_heads": 5, "model.hidden_size": 256},
            "model.num_attention_heads (5) must divide model.hidden_size (256)",
        ),
        ({"model.num_kv_heads": 3}, "model.num_kv_heads (3) must divide"),
        ({"model.num_layers": 0}, "model.num_layers must be at least 1"),
        ({"training.num_epochs": 0}, "training.num_epochs must be at least 1"),
        ({"training.max_time": "soon"}, "training.max_time: expected a duration"),
        ({"training.max_time": "-5s"}, "training.max_time: expected a duration"),
        ({"training.mixed_precision": "fp8"}, "training.mixed_precision: 'fp8' is not one of"),
        ({"resources.device": "tpu"}, "resources.device: 'tpu' is not one of"),
        ({"data.validation_fraction": 1.5}, "data.validation_fraction must be between 0 and 1"),
        ({"model.dropout": 1.0}, "model.dropout must be in [0, 1)"),
    ],
)
def test_impossible_values_are_rejected(layer, message):
    with pytest.raises(ConfigError) as info:
        load_config(cli=layer, environ={}, default_file=None)
    assert message in str(info.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("training:\n  batch_size: 4\n  learning_rate: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(bad, environ={}, default_file=None)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", environ={}, default_file=None)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(scalar, environ={}, default_file=None)


def test_null_for_a_required_key(tmp_path):
    with pytest.raises(ConfigError, match="'model.num_layers' cannot be empty; expected an integer"):
        load_config(
            write(tmp_path / "n.yaml", {"model": {"num_layers": None}}), environ={}, default_file=None
        )


def test_bad_environment_variable_name():
    with pytest.raises(ConfigError, match="LLM_TRAINING__BATCH_SIZE: expected LLM_TRAINING__SECTION__KEY"):
        load_config(environ={"LLM_TRAINING__BATCH_SIZE": "3"}, default_file=None)


@pytest.mark.parametrize(
    "text, seconds", [("70s", 70), ("15m", 900), ("2h", 7200), ("1h30m", 5400), (90, 90), ("45", 45)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_the_guides_config_files_are_shipped():
    assert {"default", "small_model", "medium_model", "large_model", "distributed", "training"} <= set(
        SHIPPED
    )
