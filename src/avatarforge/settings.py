"""Typed, validated config dataclasses: the one place where every default is written down.

Each step of the data's path has a ``@dataclass`` config whose fields are declared with
:func:`setting`: the default, a one-line help text, and bounds. ``__post_init__`` checks the
bounds and raises :class:`ConfigError` naming the field, so a bad value fails where it enters,
not deep inside training or serving. Configs round-trip through JSON and are saved beside what
they produced.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Self

from .errors import AvatarforgeError


class ConfigError(AvatarforgeError, ValueError):
    """A config value is out of range or of the wrong kind; the message names the field."""

    status = 400


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A dataclass field with its help text and bounds (read by validation, CLI and docs)."""
    meta = {"help": help, "ge": ge, "le": le, "choices": choices}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check(owner: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    name = f"{owner}.{f.name}"
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{name}: must be one of {allowed} (got {value!r})")
    if meta.get("ge") is None and meta.get("le") is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name}: must be a number (got {value!r})")
    # NaN passes every comparison and JSON parsers accept NaN; an int is finite however large
    # (math.isfinite would overflow converting 10**400 to a float)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number (got {value!r})")
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"{name}: must be >= {meta['ge']} (got {value!r})")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"{name}: must be <= {meta['le']} (got {value!r})")


class Settings:
    """Mixin for config dataclasses: bounds checked on creation, JSON round trip, docs."""

    section: str = "config"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check(self.section, f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses override and raise ConfigError."""

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{cls.section}: unknown field(s) {', '.join(unknown)}")
        values = {}
        for key, value in data.items():
            if known[key].type in ("Path", "Path | None") and value is not None:
                value = Path(value)
            elif isinstance(value, list) and isinstance(known[key].default, tuple):
                value = tuple(value)
            values[key] = value
        return cls(**values)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) for every field: the documentation of the defaults."""
        rows = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{cls.section}.{f.name}", default, f.metadata.get("help", "")))
        return rows
