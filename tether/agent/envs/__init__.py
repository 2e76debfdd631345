"""Environments by name: the built-ins (``ENVS``) and a user's own, ``module:Factory`` or ``file.py:Factory``.

``make_env_factory(spec)`` returns a callable that makes a fresh environment per episode (its keyword
arguments are the run's ``env_options``). Built-ins (docs/agents.md):

* ``frozenlake``: deterministic 4x4 FrozenLake, one-letter moves (``tether.agent.envs.frozenlake``);
* ``calculator``: ``a*b+c`` with a calculator tool ``C:<expr>``, answer ``A:<n>``;
* ``countdown``: reach a target from given numbers, tool ``C:<expr>``, answer ``A:<expr>``;
* ``guess``: guess a number in 1..32 from ``<`` / ``>`` feedback.

Optional adapters (``ADAPTERS``; the spec's prefix is reserved, so a user module named ``gym`` or ``textarena``
cannot be given as ``module:Factory``): ``gym:ID`` a gymnasium toy_text environment
(``tether.agent.envs.gym_text``; the ``agents`` extra) and ``textarena:ID`` an offline single-player textarena
game (``tether.agent.envs.textarena_games``; the ``textarena`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tether.agent.envs.calculator import Calculator
from tether.agent.envs.countdown import Countdown
from tether.agent.envs.frozenlake import FrozenLake
from tether.agent.envs.guess import Guess
from tether.configs import _did_you_mean
from tether.tasks.rewards import RewardLoadError, load_reference

ENVS: dict[str, Callable[..., Any]] = {
    "frozenlake": FrozenLake,
    "calculator": Calculator,
    "countdown": Countdown,
    "guess": Guess,
}
"""Built-in environment name -> its class (the factory; its constructor's keywords are the options)."""


class EnvLoadError(ValueError):
    """An environment spec that cannot be resolved; the message names the spec and what is wrong."""


def _gym_factory(env_id: str) -> Callable[..., Any]:
    from tether.agent.envs.gym_text import GymText, family_of

    family_of(env_id)  # unknown id, missing gymnasium: refused here, before anything is built

    def factory(**options: Any) -> GymText:
        return GymText(env_id, **options)

    return factory


def _textarena_factory(env_id: str) -> Callable[..., Any]:
    from tether.agent.envs.textarena_games import TextArenaGame, check_game

    check_game(env_id)

    def factory(**options: Any) -> TextArenaGame:
        return TextArenaGame(env_id, **options)

    return factory


ADAPTERS: dict[str, Callable[[str], Callable[..., Any]]] = {"gym": _gym_factory, "textarena": _textarena_factory}
"""Spec prefix -> the factory maker of an optional adapter (``gym:FrozenLake-v1``, ``textarena:GuessTheNumber-v0``)."""


def _is_reference(spec: str) -> bool:
    """``module:Factory`` or ``file.py:Factory`` (a Windows drive letter ``C:\\`` is not a separator)."""
    rest = spec[2:] if len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/" else spec
    return ":" in rest


def make_env_factory(spec: str) -> Callable[..., Any]:
    """The factory of ``spec``: a built-in name (``ENVS``), ``package.module:Factory`` or
    ``path/to/file.py:Factory`` (a class or a function; dotted attributes work). A user's factory is wrapped
    so that what it returns is checked to have ``reset`` and ``step``. Raises ``EnvLoadError`` naming the
    spec: an unknown name (with a did-you-mean), a module or file not found or failing to import, a missing
    attribute, an attribute that is not callable."""
    if not isinstance(spec, str) or not spec.strip():
        raise EnvLoadError(f"environment spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in ENVS:
        return ENVS[spec]
    prefix, _, env_id = spec.partition(":")
    if prefix in ADAPTERS and env_id:
        try:
            factory = ADAPTERS[prefix](env_id)
        except ValueError as e:
            raise EnvLoadError(str(e)) from e
        factory.__name__ = factory.__qualname__ = spec
        return factory
    if not _is_reference(spec):
        hint = _did_you_mean(spec.lower(), sorted(ENVS), {})
        raise EnvLoadError(f"environment {spec!r} is not a built-in{hint}; built-ins: {', '.join(sorted(ENVS))}; "
                           "a user's environment is given as 'module:Factory' or 'path/to/file.py:Factory'")
    try:
        obj = load_reference(spec, "environment")
    except RewardLoadError as e:
        raise EnvLoadError(str(e)) from e
    if not callable(obj):
        raise EnvLoadError(f"environment {spec!r}: {spec.rpartition(':')[2]!r} is a {type(obj).__name__}, "
                           "not a class or function that makes an environment")

    def factory(**options: Any):
        env = obj(**options)
        if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
            raise EnvLoadError(f"environment {spec!r}: the factory returned {type(env).__name__}, which has no "
                               "reset(seed) / step(action) (tether.agent.env.TextEnv)")
        return env

    factory.__name__ = factory.__qualname__ = getattr(obj, "__name__", "factory")
    factory.__doc__ = getattr(obj, "__doc__", None)
    return factory


def env_names() -> list[str]:
    return sorted(ENVS)
