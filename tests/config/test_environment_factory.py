"""`environment_factory` (TRL's name for tool-calling environments): one of two ways to name an episode's
environment, with its own reward rules and TRL's max_tool_calling_iterations pointed to max_turns."""

from __future__ import annotations

import pytest

from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config

FACTORY = {"environment_factory": "pkg.tools:Calculator", "max_turns": 3}


def test_environment_factory_plays_episodes_and_may_keep_reward_funcs():
    config = Config.from_dict({**FACTORY, "reward_funcs": ["pkg.rewards:exact"]})
    config.validate()
    assert config.environment.plays_episodes and config.environment.environment is None
    Config.from_dict(FACTORY).validate()  # get_reward() alone may score (checked when the class loads)
    assert not Config().environment.plays_episodes


def test_environment_and_environment_factory_are_exclusive():
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({**FACTORY, "environment": "pkg.env:User"}).validate()
    assert str(caught.value) == (
        "environment ('pkg.env:User') and environment_factory ('pkg.tools:Calculator') both name the episodes' "
        "environment: keep one (environment: reset(row)/step(response); environment_factory: TRL's tool methods, "
        "reset(**row))")


def test_environment_factory_refuses_a_reward_model():
    with pytest.raises(ConfigError, match="a reward model is not read on tool-calling transcripts"):
        Config.from_dict({**FACTORY, "reward_model_name_or_path": "rm"}).validate()


def test_plain_environment_still_refuses_reward_funcs():
    with pytest.raises(ConfigError, match="an environment gives the rewards of multi-turn episodes"):
        Config.from_dict({"environment": "pkg.env:User", "reward_funcs": ["pkg.rewards:exact"]}).validate()


def test_trls_max_tool_calling_iterations_points_to_max_turns():
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({**FACTORY, "max_tool_calling_iterations": 2})
    assert "Did you mean max_turns?" in str(caught.value)
    assert "max_tool_calling_iterations + 1" in str(caught.value)
