"""One base for the frozen config and option dataclasses (features, SpecAugment, models,
training, decoding, endpointing, the server).

Every one of them serialises the same way (`to_dict` is `asdict`; `from_dict` rebuilds nested
configs and rejects keys the class does not have, so a bundle or experiment written by a newer
version fails loudly instead of silently dropping a setting) and validates the same way
(`check`: one ValueError naming every field that breaks its rule, with the rule).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, Self


class Config:
    """Mixin for a frozen dataclass; see the module docstring."""

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
        hints = typing.get_type_hints(cls)
        values = {name: _nested(hints[name], value) for name, value in data.items()}
        return cls(**values)

    def check(self, rules: Mapping[str, tuple[bool, str]]) -> None:
        """Raise one ValueError for every field whose rule fails: rules map a field name to
        (whether its value is valid, the rule in words, e.g. ">= 1")."""
        bad = [
            f"{name} must be {rule}, got {getattr(self, name)!r}"
            for name, (ok, rule) in rules.items()
            if not ok
        ]
        if bad:
            raise ValueError(f"invalid {type(self).__name__}: {'; '.join(bad)}")


def _nested(hint: Any, value: Any) -> Any:
    """`value` rebuilt as the Config its field holds (`X` or `X | None`), if it is a dict."""
    if not isinstance(value, Mapping):
        return value
    for kind in (hint, *typing.get_args(hint)):
        if isinstance(kind, type) and issubclass(kind, Config):
            return kind.from_dict(value)
    return value
