"""Style packs on disk: TOML files shipped with avatarforge and in the user's pack folder.

Shipped packs are package data (``avatarforge/data/packs/<name>.toml``). The user's packs live
in ``$AVATARFORGE_PACKS`` when set, else ``$XDG_CONFIG_HOME/avatarforge/packs`` (by default
``~/.config/avatarforge/packs``); a user pack named like a shipped one replaces it. A pack's
name is its file name without ``.toml``. Every field is checked when the pack is read: an error
names the file and the field (``styles[1].prompt: ...``) and says what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..errors import AvatarforgeError
from ..generate import GenArgs
from ..settings import ConfigError
from .model import Framing, Pack, Style

ENV = "AVATARFORGE_PACKS"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PLACEHOLDERS = ("token", "framing")
MAX_ITEMS = 64  # styles x framings: one pack run is bounded work on the server
TOP = {"description": str, "defaults": dict, "styles": list, "framings": list}
DEFAULTS = {"negative_prompt": str, "gen_args": dict}
STYLE = {"name": str, "prompt": str, "negative_prompt": str, "gen_args": dict}
FRAMING = {"name": str, "text": str, "negative_prompt": str, "gen_args": dict}


class PackError(AvatarforgeError, ValueError):
    """A pack file is malformed; the message names the file and the field."""

    status = 400


class UnknownPackError(PackError, LookupError):
    """No pack of that name, shipped or in the user's folder."""

    status = 404


@dataclass(frozen=True)
class PackFile:
    name: str
    path: Path | None  # None: shipped, read from package data
    text: str
    user: bool

    @property
    def source(self) -> str:
        return str(self.path) if self.path else f"avatarforge/data/packs/{self.name}.toml"


def user_packs_dir() -> Path:
    """The folder of the user's own packs (it need not exist)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "avatarforge" / "packs"


def _shipped() -> dict[str, PackFile]:
    folder = files("avatarforge") / "data" / "packs"
    return {
        entry.name.removesuffix(".toml"): PackFile(
            entry.name.removesuffix(".toml"), None, entry.read_text(encoding="utf-8"), False
        )
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    }


def pack_files() -> dict[str, PackFile]:
    """Every pack by name, sorted: shipped ones, replaced by the user's of the same name."""
    found = _shipped()
    folder = user_packs_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.toml")):
            found[path.stem] = PackFile(path.stem, path, "", True)
    return dict(sorted(found.items()))


def load_pack(name: str) -> Pack:
    """The pack called ``name``; UnknownPackError (with "did you mean") when there is none."""
    available = pack_files()
    if name not in available:
        close = difflib.get_close_matches(name, list(available), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownPackError(
            f"unknown pack {name!r}: {hint}packs: {', '.join(available) or 'none'} "
            f"(your own go in {user_packs_dir()}, see `avatarforge packs list`)"
        )
    return read_pack(available[name])


def read_pack(found: PackFile) -> Pack:
    text = found.text
    if found.path is not None:
        try:
            text = found.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PackError(f"{found.path}: cannot read it ({exc})") from None
    return parse_pack(text, found.name, source=found.source, user=found.user)


def parse_pack(text: str, name: str, *, source: str = "<pack>", user: bool = True) -> Pack:
    """A Pack from TOML text, every field checked; PackError names ``source`` and the field."""
    if not NAME.fullmatch(name):
        raise PackError(
            f"{source}: pack name {name!r} (the file name): use lowercase letters, digits, "
            "'-' or '_', starting with a letter or digit"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PackError(f"{source}: not valid TOML ({exc})") from None
    _fields(data, TOP, source, "")
    defaults = data.get("defaults", {})
    _fields(defaults, DEFAULTS, source, "defaults")
    styles = _entries(data, "styles", STYLE, ("name", "prompt"), source)
    framings = _entries(data, "framings", FRAMING, ("name", "text"), source)
    if len(styles) * len(framings) > MAX_ITEMS:
        raise PackError(
            f"{source}: {len(styles)} styles x {len(framings)} framings = "
            f"{len(styles) * len(framings)} avatars; a pack may make at most {MAX_ITEMS}"
        )
    for i, style in enumerate(styles):
        where = f"styles[{i}].prompt"
        _placeholders(style["prompt"], source, where, allowed=PLACEHOLDERS)
        if "{token}" not in style["prompt"]:
            raise PackError(
                f"{source}: {where}: must name the person with {{token}} "
                f"(e.g. 'a portrait of {{token}} person'), got {style['prompt']!r}"
            )
    return Pack(
        name=name,
        description=data.get("description", ""),
        source=source,
        user=user,
        styles=tuple(Style(**s) for s in styles),
        framings=tuple(Framing(**f) for f in framings),
        negative_prompt=defaults.get("negative_prompt", ""),
        gen_args=_gen_args(defaults.get("gen_args", {}), source, "defaults.gen_args"),
    )


def _entries(
    data: dict[str, Any], key: str, schema: dict[str, type], required: tuple[str, ...], source: str
) -> list[dict[str, Any]]:
    entries = data.get(key)
    if not entries:
        raise PackError(f"{source}: {key}: missing; the pack needs at least one of them")
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise PackError(f"{source}: {where}: must be a table, got {entry!r}")
        _fields(entry, schema, source, where)
        for name in required:
            if not entry.get(name, "").strip():
                raise PackError(f"{source}: {where}.{name}: missing (required, non-empty text)")
        if not NAME.fullmatch(entry["name"]):
            raise PackError(
                f"{source}: {where}.name: {entry['name']!r}: use lowercase letters, digits, "
                "'-' or '_' (it becomes part of a file name)"
            )
        if entry["name"] in seen:
            raise PackError(f"{source}: {where}.name: {entry['name']!r} is used twice in {key}")
        seen.add(entry["name"])
        entry = dict(entry)
        entry["gen_args"] = _gen_args(entry.get("gen_args", {}), source, f"{where}.gen_args")
        out.append(entry)
    return out


def _fields(table: Any, schema: dict[str, type], source: str, where: str) -> None:
    """Unknown keys (with "did you mean") and wrong types, named by their path."""
    prefix = f"{where}." if where else ""
    if not isinstance(table, dict):
        raise PackError(f"{source}: {where}: must be a table, got {table!r}")
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise PackError(
                f"{source}: {prefix}{key}: unknown field ({hint}allowed: {', '.join(schema)})"
            )
        kind = schema[key]
        if not isinstance(value, kind):
            what = {str: "text", dict: "a table", list: "an array of tables"}[kind]
            raise PackError(f"{source}: {prefix}{key}: must be {what}, got {value!r}")


def _placeholders(text: str, source: str, where: str, *, allowed: tuple[str, ...]) -> None:
    """A template's {names}: each a plain ``{name}`` of ``allowed``; braces must pair up.

    No format spec or conversion: ``str.format`` would act on them (``{token:>2000000000}``
    allocates gigabytes, ``{framing!r:^99...9}`` raises), and a prompt needs none."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text)]
    except ValueError as exc:
        raise PackError(
            f"{source}: {where}: {exc} (write a literal brace as '{{{{' or '}}}}')"
        ) from None
    plain = " or ".join(f"{{{a}}}" for a in allowed)
    for name, spec, conversion in fields:
        if name is None:
            continue
        if spec or conversion:
            field = (
                f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            )
            shown = field if len(field) <= 60 else field[:57] + "..."
            raise PackError(
                f"{source}: {where}: {shown}: only plain {plain} fields (no format spec or "
                "conversion)"
            )
        if name not in allowed:
            may = ", ".join(f"{{{a}}}" for a in allowed) or "none"
            raise PackError(
                f"{source}: {where}: unknown placeholder {{{name}}} (placeholders allowed "
                f"here: {may})"
            )


def _gen_args(values: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """The given gen_args, each field checked (unknown names, bounds) as a request would be."""
    try:
        GenArgs.from_dict(values)
    except ConfigError as exc:
        raise PackError(f"{source}: {where}: {exc}") from None
    return dict(values)
