"""TrainConfig's lists of choices are the owners' lists: engine presets, engine roundings, model tables."""

from __future__ import annotations

from dataclasses import fields

import pytest

from curvzo import config
from curvzo.config import TrainConfig
from curvzo.errors import ConfigError
from curvzo.model_options import DTYPES, PEFT_MODES
from curvzo.optim import PRESETS
from curvzo.optim import ROUNDINGS as ENGINE_ROUNDINGS


def test_zo_methods_are_the_engine_presets():
    assert config.ZO_METHODS == tuple(PRESETS)
    for name in PRESETS:
        assert TrainConfig(method=name).is_zo


def test_a_method_outside_presets_and_first_order_baselines_is_refused():
    assert set(config.METHODS) == set(PRESETS) | set(config.FO_METHODS)
    with pytest.raises(ConfigError, match="`method` must be one of " + ", ".join(config.METHODS)):
        TrainConfig(method="adam")


def test_roundings_are_the_engines_with_the_config_default_first():
    default = next(f.default for f in fields(TrainConfig) if f.name == "rounding")
    assert config.ROUNDINGS[0] == default and sorted(config.ROUNDINGS) == sorted(ENGINE_ROUNDINGS)
    for rounding in ENGINE_ROUNDINGS:
        assert TrainConfig(rounding=rounding).rounding == rounding


@pytest.mark.parametrize(("name", "table"), [("dtype", tuple(DTYPES)), ("peft", PEFT_MODES)])
def test_dtype_and_peft_choices_are_the_model_tables(name, table):
    for value in table:
        assert getattr(TrainConfig(**{name: value}), name) == value
    with pytest.raises(ConfigError, match=f"`{name}` must be one of {', '.join(table)}"):
        TrainConfig(**{name: "int4"})
    help_text = next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)
    assert all(value in help_text for value in table)


def test_an_unhashable_choice_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError, match="`dtype` must be one of"):
        TrainConfig(dtype=["float32"])


def test_yaml_reads_exponents_without_a_dot_as_numbers_in_files_and_overrides(tmp_path):
    from curvzo.config import load_config, parse_overrides

    path = tmp_path / "run.yaml"
    path.write_text("method: curvzo-sparse\nlr: 1e-5\neps: 1.0e-3\nweight_decay: 2E-2\noptimizer_options: {pi_floor: 5e-2}\n")
    cfg = load_config(path, parse_overrides(["eps=3e-4"]))
    assert (cfg.lr, cfg.eps, cfg.weight_decay, cfg.optimizer_options) == (1e-5, 3e-4, 2e-2, {"pi_floor": 5e-2})
    assert parse_overrides(["model=1e5x", "seed=7"]) == {"model": "1e5x", "seed": 7}  # only whole numbers convert


@pytest.mark.parametrize(("key", "value", "message"), [
    ("steps", True, "`steps` must be an integer >= 1, got True"),
    ("seed", 1.0, "`seed` must be an integer, got 1.0"),
    ("lr", "1e-5", "`lr` must be a finite number > 0, got '1e-5'"),
    ("weight_decay", float("inf"), "`weight_decay` must be a finite number >= 0"),
])
def test_bools_strings_and_non_finite_values_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{key: value})


def test_the_default_lr_of_a_newton_run_is_the_fraction_of_the_newton_step():
    from curvzo.config import DEFAULT_LR, TrainConfig

    assert TrainConfig(method="mezo").resolved_lr() == DEFAULT_LR["zo"][0]
    newton = TrainConfig(method="curvzo", optimizer_options={"newton": True})
    assert newton.resolved_lr() == 0.1 and TrainConfig(method="mezo", optimizer_options={"newton": True}, lr=0.05).resolved_lr() == 0.05
