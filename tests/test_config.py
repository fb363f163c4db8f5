"""Config: recipes and overrides become one typed Config; mistakes are errors that say what to change."""

from __future__ import annotations

import pytest
import yaml

from rl.cli import shipped_recipes
from rl.config import Config, ConfigError, load_config, parse_override


def _recipe(tmp_path, data: dict):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_values_and_overrides_reach_the_typed_config(tmp_path):
    path = _recipe(tmp_path, {"train": {"steps": 7}, "algorithm": {"scale": "none"}})
    config = load_config(path, ["train.steps=9", "optim.lr=3e-4", "rollout.stop=['</answer>']"])
    assert isinstance(config, Config)
    assert config.train.steps == 9
    assert config.algorithm.scale == "none"
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.rollout.stop == ["</answer>"]
    assert config.train.prompts_per_step == Config().train.prompts_per_step  # untouched default


def test_integer_given_for_a_float_field_is_accepted_as_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_unknown_key_is_an_error_that_suggests_the_closest_key(tmp_path):
    path = _recipe(tmp_path, {"train": {"stesp": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stesp'; did you mean 'train\.steps'"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'rollouts'; did you mean 'rollout'"):
        load_config(None, ["rollouts.group_size=4"])


def test_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 'ten'"):
        load_config(None, ["train.steps=ten"])


def test_invalid_choice_lists_the_choices_and_suggests_one():
    with pytest.raises(ConfigError, match=r"algorithm\.scale: 'grup' is not one of .*did you mean 'group'"):
        load_config(None, ["algorithm.scale=grup"])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_group_size_one_is_refused_whatever_the_advantage_knobs(scale, baseline):
    # every group-relative advantage of a one-sample group is 0: such a run trains on zeros
    with pytest.raises(ConfigError, match="every advantage is 0 and nothing trains.*group_size >= 2"):
        load_config(
            None, ["rollout.group_size=1", f"algorithm.scale={scale}", f"algorithm.baseline={baseline}"]
        )


def test_prompts_not_divisible_into_minibatches_is_an_error():
    with pytest.raises(ConfigError, match="not divisible by algorithm.minibatches"):
        load_config(None, ["train.prompts_per_step=6", "algorithm.minibatches=4"])


def test_sharding_choices_are_ddp_and_fsdp_and_fsdp_refuses_lora():
    assert load_config(None, []).train.sharding == "ddp"
    assert load_config(None, ["train.sharding=fsdp"]).train.sharding == "fsdp"
    with pytest.raises(ConfigError, match=r"train\.sharding: 'zero3' is not one of 'ddp' \| 'fsdp'"):
        load_config(None, ["train.sharding=zero3"])
    with pytest.raises(ConfigError, match="use train.sharding=ddp"):
        load_config(None, ["train.sharding=fsdp", "model.lora.r=8"])


def test_missing_recipe_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.steps")


def test_rewards_list_builds_reward_specs():
    config = load_config(None, ["rewards=[{name: math, weight: 1.0}, {name: format, weight: 0.1}]"])
    assert [(r.name, r.weight) for r in config.rewards] == [("math", 1.0), ("format", 0.1)]
    with pytest.raises(ConfigError, match=r"rewards\[0\]"):
        load_config(None, ["rewards=[{nam: math}]"])


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    load_config(shipped_recipes()[name])
