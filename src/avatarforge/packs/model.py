"""A style pack: styles x framings, each combination one prompt for the served user model.

A style says what the avatar looks like (its prompt names the person with ``{token}`` and puts
the framing's words where ``{framing}`` stands, or after a comma at the end); a framing says how
much of the person is in the picture and may change the size. Negative prompts add up (pack
defaults, style, framing); ``gen_args`` merge field by field (defaults, style, framing, then the
caller's override), and every merged set is a valid :class:`~avatarforge.generate.GenArgs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..generate import GenArgs

DEFAULT_TOKEN = "<<TOK>>"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str  # uses {token}, optionally {framing}
    negative_prompt: str = ""
    gen_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Framing:
    name: str
    text: str
    negative_prompt: str = ""
    gen_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PackItem:
    """One avatar to render: the request for the served model, and where it came from."""

    index: int
    style: str
    framing: str
    prompt: str
    negative_prompt: str
    gen_args: dict[str, Any]  # every GenArgs field, canonical names

    @property
    def label(self) -> str:
        return f"{self.style} x {self.framing}"

    @property
    def stem(self) -> str:
        """File name stem: ``NN-style-framing``."""
        return f"{self.index:02d}-{self.style}-{self.framing}"


@dataclass(frozen=True)
class Pack:
    name: str
    description: str
    source: str  # the file it was read from
    user: bool  # from the user's pack folder (else shipped with avatarforge)
    styles: tuple[Style, ...]
    framings: tuple[Framing, ...]
    negative_prompt: str = ""
    gen_args: dict[str, Any] = field(default_factory=dict)

    def items(
        self, token: str = DEFAULT_TOKEN, override: dict[str, Any] | None = None
    ) -> list[PackItem]:
        """Every style x framing (styles outer), with ``override`` merged into each gen_args
        last; a ConfigError names the bad field of the override."""
        out = []
        for style in self.styles:
            for framing in self.framings:
                merged = {**self.gen_args, **style.gen_args, **framing.gen_args}
                merged.update(override or {})
                negatives = (self.negative_prompt, style.negative_prompt, framing.negative_prompt)
                out.append(
                    PackItem(
                        index=len(out),
                        style=style.name,
                        framing=framing.name,
                        prompt=fill(style.prompt, token, framing.text),
                        negative_prompt=", ".join(n for n in negatives if n),
                        gen_args=GenArgs.from_dict(merged).to_dict(),
                    )
                )
        return out


def fill(template: str, token: str, framing: str) -> str:
    """A style prompt with the token and the framing's words in place."""
    if "{framing}" not in template:
        template = f"{template}, {{framing}}" if framing else template
    return template.format(token=token, framing=framing)
