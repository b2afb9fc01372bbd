"""The training options of the command line, generated from :class:`~layerlab.config.TrainConfig`'s fields.

Each option's name, type and help come from its field (``metadata``), so a setting has one home. A command
decorated with :func:`config_options` receives a :class:`ConfigArgs`: the profile, an optional ``--config
FILE`` and the options given explicitly, applied in that order (later ones win) by :meth:`ConfigArgs.build`.

Units: on the command line eps and the PGD step are in 1/255 of the [0, 1] input range (``--eps 8 --pgd-step 2``
is 8/255 and 2/255); a config file holds a config as a run's ``config.json`` does (fractions of the input
range), where a string such as ``"8/255"`` is also read.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import yaml

from layerlab.config import PROFILES, TrainConfig, make_config, upgrade

UNITS_HELP = ("eps and --pgd-step are in 1/255 units (--eps 8 --pgd-step 2 = 8/255, 2/255); "
              "a --config file holds a config as a run's config.json does (fractions, or strings like \"8/255\")")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def flag_of(name: str) -> str:
    """The command-line option of config field ``name`` (``batch_size`` -> ``--batch-size``)."""
    return "--" + _FIELDS[name].metadata.get("flag", name.replace("_", "-"))


def _base_type(name: str) -> type:
    hint = _TYPES[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def switch(default: bool | None, *decls: str, **kwargs: Any) -> Any:
    """An on/off option (``--x`` or ``--x/--no-x``): like ``typer.Option``, shown in ``--help`` without a value
    type, since it takes none."""
    return typer.Option(default, *decls, metavar="", **kwargs)


def _parameter(name: str) -> inspect.Parameter:
    """A typer option for config field ``name``; its default None means "not given"."""
    meta = _FIELDS[name].metadata
    kind = _base_type(name)
    flag = flag_of(name)
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    option = (switch if kind is bool else typer.Option)(None, *decls, help=meta["help"],
                                                         rich_help_panel="Training config")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def _number(value: Any, key: str) -> float:
    """A config-file number: a float or a fraction string such as ``"8/255"``."""
    try:
        return float(Fraction(value)) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"config key {key!r}: {value!r} is not a number or a fraction like 8/255") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The config values in a JSON or YAML file (a run's ``config.json`` too), checked against the fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON ({err}); YAML files end in .yaml") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run's config.json
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of config keys to values")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {unknown}; valid keys: {sorted(_FIELDS)}")
    return upgrade({k: _number(v, k) if _base_type(k) is float and v is not None else v for k, v in data.items()})


@dataclass(frozen=True)
class ConfigArgs:
    """A command's profile, config file and explicitly given training options (in config units)."""

    profile: str
    file: Path | None
    given: dict[str, Any]

    def build(self, start: TrainConfig | None = None, **between: Any) -> TrainConfig:
        """The profile's config (or ``start``, e.g. the config of a run to resume), then the file's values, then
        ``between`` (e.g. a method preset's config), then the options given on the command line; checked
        (:meth:`TrainConfig.validate`)."""
        cfg = make_config(self.profile) if start is None else start
        if self.file is not None:
            cfg = dataclasses.replace(cfg, **read_config_file(self.file))
        return cfg.replace(**between).replace(**self.given).validate()


def config_options(*, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command ``--profile``, ``--config FILE`` and one option per config field (except ``skip`` and the
    fields marked ``cli=False``); the command receives them as its ``config: ConfigArgs`` parameter."""
    names = [n for n, f in _FIELDS.items() if f.metadata.get("cli", True) and n not in skip]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]
        extra = [
            inspect.Parameter("profile", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
                "smoke", help=f"consistent defaults: {', '.join(PROFILES)} (a config file and any option override "
                              f"them)", rich_help_panel="Training config")),
            inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                              default=typer.Option(None, "--config", help="a config as JSON or YAML (keys of "
                                                   "config.json; a run's config.json works too)",
                                                   rich_help_panel="Training config")),
        ] + [_parameter(n) for n in names]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {}
            for n in names:
                value = kwargs.pop(n)
                if value is not None:
                    given[n] = value / _FIELDS[n].metadata["per"] if "per" in _FIELDS[n].metadata else value
            config = ConfigArgs(kwargs.pop("profile"), kwargs.pop("config_file"), given)
            return command(config=config, **kwargs)

        wrapper.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
                                                  + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        del wrapper.__wrapped__  # typer reads the new signature, not the command's
        return wrapper

    return decorate

