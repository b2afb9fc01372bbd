"""Training methods as *objective + components*, run by the one shared trainer step.

An :class:`Objective` says which adversarial examples a method crafts and which loss it
minimizes (ST, PGD-AT, TRADES, MART, ...). A :class:`Component` changes the step around that
loss (adversarial weight perturbation, a gradient mask, a revision model) through a few
hooks, so that e.g. TRADES-RWP is TRADES + the RWP component, not a copy of the training loop.
Each module registers its methods and presets in its own ``METHODS`` / ``PRESETS``; this
package merges them.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from layerlab.methods import cure, objectives, perturbation, removal
from layerlab.methods.base import AttackSettings, Component, Method, Objective, Outputs, StepContext  # noqa: F401

MethodFactory = Callable[..., Method]

# name -> (factory, one-line description)
METHODS: dict[str, tuple[MethodFactory, str]] = {**objectives.METHODS, **cure.METHODS, **perturbation.METHODS,
                                                 **removal.METHODS}

# preset name -> (method, method_args, config overrides, description). Hyper-parameters from the papers.
PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {**objectives.PRESETS, **cure.PRESETS,
                                                                      **perturbation.PRESETS, **removal.PRESETS}


def build_method(name: str, args: dict[str, Any] | None = None) -> Method:
    """The method registered as ``name`` with hyper-parameters ``args``; unknown names list the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    factory, _ = METHODS[name]
    _check_types(name, factory, args or {})
    try:
        return factory(**(args or {}))
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters for method {name!r}: {err}") from None


def _check_types(name: str, factory: MethodFactory, args: dict[str, Any]) -> None:
    """Refuse a hyper-parameter whose value does not have the type its factory declares (a number for a float,
    a whole number for an int, ...), naming the key and the expected type."""
    params = inspect.signature(factory, eval_str=True).parameters
    for key, value in args.items():
        if key not in params or params[key].annotation is inspect.Parameter.empty:
            continue  # unknown keys: the factory's own TypeError names them
        expected = params[key].annotation
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected in (bool, str):
            ok = isinstance(value, expected)
        else:
            continue
        if not ok:
            kind = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}[expected]
            default = params[key].default
            example = default if isinstance(default, str) else json.dumps(default)
            raise ValueError(f"method {name!r}: hyper-parameter {key} must be {kind}, got {value!r} "
                             f"(e.g. --arg {key}={example})")


def _parse_value(text: str) -> Any:
    """``KEY=VALUE`` values: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_method(method: str, preset: str | None = None,
                   args: list[str] | tuple[str, ...] = ()) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method name, hyper-parameters, config overrides) from a method, an optional preset and ``KEY=VALUE``
    arguments, which override the preset's values."""
    method_args: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} (`layerlab presets`)")
        method, preset_args, overrides, _ = PRESETS[preset]
        method_args.update(preset_args)
    for item in args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"method argument {item!r} is not KEY=VALUE (e.g. --arg beta=6)")
        method_args[key.strip()] = _parse_value(value.strip())
    build_method(method, method_args)  # validate names and hyper-parameters now, not after loading data
    return method, method_args, dict(overrides)
