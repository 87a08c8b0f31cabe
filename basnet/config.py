"""Config machinery shared by every job: dataclass fields that build their own flags and checks,
a YAML file as argparse defaults (flags override the file), and plain values for YAML.

Each feature declares its own dataclass (``basnet.train.config.TrainConfig``,
``basnet.infer.config.InferConfig``, ...) with :func:`option` fields; the checks an option
needs (positive, a multiple of 32, a range) are declared on the field once and run by
:func:`check_options`. The dataclasses are plain data: jobs turn them into dicts only at the Ray
boundary, and the resolved config is saved beside every checkpoint and every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import field
from pathlib import PurePath
from typing import Any, TypeVar

import yaml

from basnet.errors import ConfigError

__all__ = ["PRECISIONS", "PUBLISHED_IMAGE_SIZE", "option", "option_type", "check_options", "add_options", "build_parser", "parse_config", "load_yaml",
           "from_dict", "plain", "default_crop"]

T = TypeVar("T")

PUBLISHED_IMAGE_SIZE = 256  # the published basnet.pth was trained at 256 x 256
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # --precision of every job; basnet.device says what each means
_PARSER_KEYS = ("choices", "metavar")


def option(default: Any, help: str, *, positive: bool = False, at_least: float | None = None,
           between: tuple[float, float] | None = None, within: tuple[float, float] | None = None,
           multiple_of: int | None = None, at_least_means: str = "", **extra: Any) -> Any:
    """A dataclass field whose ``help`` (and argparse extras such as ``choices``) build its flag.

    Args:
        default: The field's default.
        help: The flag's help text.
        positive: The value must be above 0.
        at_least: The value must be at least this (``at_least_means`` names what the bound means,
            e.g. ``"(never)"`` for a 0 that switches something off).
        between: ``(low, high)``: the value must lie strictly between them.
        within: ``(low, high)``: the value must lie in the closed interval.
        multiple_of: The value must be a positive multiple of this (BASNet's sides: 32).
        **extra: Passed to argparse (``choices``, ``metavar``).
    """
    checks = {"positive": positive, "at_least": at_least, "between": between, "within": within,
              "multiple_of": multiple_of, "at_least_means": at_least_means}
    # `is not None`, not truthiness: at_least=0 is a bound too
    kept = {k: v for k, v in checks.items() if v is not None and v is not False and v != ""}
    return field(default=default, metadata={"help": help, **extra, **kept})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_value(name: str, value: Any, meta: typing.Mapping) -> None:
    flag = _flag(name)
    step = meta.get("multiple_of")
    if step and (value < step or value % step):
        raise ConfigError(f"{flag} {value} is not a multiple of {step} (>= {step}): BASNet downsamples by {step}")
    if meta.get("positive") and value <= 0:
        raise ConfigError(f"{flag} must be positive, got {value}")
    low = meta.get("at_least")
    if low is not None and value < low:
        means = f" {meta['at_least_means']}" if meta.get("at_least_means") else ""
        raise ConfigError(f"{flag} must be {low:g}{means} or more, got {value}")
    bounds = meta.get("between")
    if bounds and not bounds[0] < value < bounds[1]:
        raise ConfigError(f"{flag} must be between {bounds[0]:g} and {bounds[1]:g}, got {value}")
    closed = meta.get("within")
    if closed and not closed[0] <= value <= closed[1]:
        raise ConfigError(f"{flag} must lie in [{closed[0]:g}, {closed[1]:g}], got {value}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(map(str, meta['choices']))}")


def check_options(cfg: Any) -> None:
    """Runs the checks every field of the dataclass ``cfg`` declares; ``None`` means "not set".

    Raises:
        ConfigError: One line naming the first bad option.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is not None:
            _check_value(f.name, value, f.metadata)


def option_type(cls: type, f: dataclasses.Field) -> type:
    """A field's type with ``Optional`` removed (``int | None`` -> ``int``)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                suppress: bool = False, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls`` (``--x/--no-x`` for booleans); ``suppress`` leaves
    flags that are not given out of the parsed namespace."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = option_type(cls, f)
        default = argparse.SUPPRESS if suppress else f.default
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=default, help=help_text,
                                **{k: v for k, v in f.metadata.items() if k in _PARSER_KEYS})


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per dataclass field plus ``--config FILE.yaml``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of options (keys as the flags, with _); flags override it")
    add_options(parser, cls)
    return parser


def load_yaml(path: str) -> dict:
    from basnet import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    """Builds a config from a dict, refusing keys the dataclass does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} in {source}: known options are "
                          f"{', '.join(sorted(known))}")
    return cls(**data)


def parse_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """Parses flags over an optional YAML file into a ``cls`` instance."""
    parser = build_parser(cls, description)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        defaults = load_yaml(pre.config)
        from_dict(cls, defaults, source=pre.config)  # refuses unknown keys
        parser.set_defaults(**defaults)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return cls(**args)


def plain(value: Any) -> Any:
    """Numpy and torch scalars, tuples and paths as the builtins YAML, Arrow and ``weights_only`` take."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, PurePath):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def default_crop(image_size: int) -> int:
    """The random-crop side for an image side: 7/8 of it, rounded to a multiple of 32 (256 -> 224)."""
    return max(32, round(image_size * 7 / 8 / 32) * 32)
