"""One base for the frozen config and option dataclasses (features, SpecAugment, models,
training, decoding, endpointing, the server).

Every one of them serialises the same way (`to_dict` is `asdict`; `from_dict` rebuilds nested
configs and rejects keys the class does not have, so a bundle or experiment written by a newer
version fails loudly instead of silently dropping a setting) and validates the same way: on
construction every field's value is checked against its type hint, then the class's
`validate` states its rules through `check`; either way one ValueError names every bad field
with what it must be. Wrong types never surface as a TypeError from deep inside a rule, so a
value typed by a user (`--set beam=abc`) or read from a file gets the same clear error.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, Literal, Self, Union


class Config:
    """Mixin for a frozen dataclass; see the module docstring. Subclasses put their rules in
    `validate` (not `__post_init__`, which checks the types first)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        self._fail(
            [
                f"{f.name} must be {_describe(hints[f.name])}, got {getattr(self, f.name)!r}"
                for f in fields(self)  # type: ignore[arg-type]
                if not _conforms(hints[f.name], getattr(self, f.name))
            ]
        )
        self.validate()

    def validate(self) -> None:
        """Rules beyond the field types: `self.check({...})`."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (nested configs as dicts)."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild from `to_dict` output; ValueError for a key the class does not have."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        hints = _hints(cls)
        values = {name: _nested(hints[name], value) for name, value in data.items()}
        return cls(**values)

    def check(self, rules: Mapping[str, tuple[bool, str]]) -> None:
        """Raise one ValueError for every field whose rule fails: rules map a field name to
        (whether its value is valid, the rule in words, e.g. ">= 1")."""
        self._fail(
            [
                f"{name} must be {rule}, got {getattr(self, name)!r}"
                for name, (ok, rule) in rules.items()
                if not ok
            ]
        )

    def _fail(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: {'; '.join(problems)}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config class (computed once: configs are built per
    request, e.g. DecodeOptions)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _conforms(hint: Any, value: Any) -> bool:
    """Whether `value` has the type `hint` says (the shapes our configs use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_conforms(h, value) for h in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(args[0], v) for v in value)
        return len(args) == len(value) and all(map(_conforms, args, value))
    if origin is not None:  # dict[...], list[...]: the container type only
        return isinstance(value, origin)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # a bool is an int to Python, never to a user
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in args)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint is type(None):
        return "None"
    if hint in names:
        return names[hint]
    return getattr(hint, "__name__", str(hint))


def _nested(hint: Any, value: Any) -> Any:
    """`value` rebuilt as the Config its field holds (`X` or `X | None`), if it is a dict; a
    list (what JSON makes of a tuple) as the tuple its field holds."""
    if isinstance(value, list):
        for kind in (hint, *typing.get_args(hint)):
            if typing.get_origin(kind) is tuple:
                args = typing.get_args(kind)
                if len(args) == 2 and args[1] is Ellipsis:
                    return tuple(_nested(args[0], v) for v in value)
                if len(args) == len(value):
                    return tuple(_nested(a, v) for a, v in zip(args, value, strict=True))
                return tuple(value)
    if not isinstance(value, Mapping):
        return value
    for kind in (hint, *typing.get_args(hint)):
        if isinstance(kind, type) and issubclass(kind, Config):
            return kind.from_dict(value)
    return value
