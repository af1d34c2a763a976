"""Render a pack's items through a served model: one request per item, in order."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AvatarforgeError
from .model import DEFAULT_TOKEN, Pack, PackItem

# One user's served model: (prompt, negative prompt, gen_args) -> JPEGs as the server sent them.
# :mod:`.targets` makes one for tritonserver, the local MME or an endpoint.
Generate = Callable[[str, "str | None", dict[str, Any]], list[bytes]]


class RenderError(AvatarforgeError):
    """A request for one of the pack's avatars failed; the message names the item."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Rendered:
    item: PackItem
    jpegs: tuple[bytes, ...]  # exactly as the server sent them
    seconds: float


def render_pack(
    items: Sequence[PackItem],
    generate: Generate,
    on_item: Callable[[int, int, Rendered], None] | None = None,
) -> list[Rendered]:
    """Request every item from ``generate``; ``on_item(done, total, r)``
    after each. The first failure stops the run with a RenderError naming the item."""
    out = []
    for item in items:
        started = time.perf_counter()
        try:
            jpegs = generate(item.prompt, item.negative_prompt or None, item.gen_args)
        except (AvatarforgeError, RuntimeError, OSError, ValueError) as exc:
            status = getattr(exc, "status", 500)
            raise RenderError(
                f"avatar {item.index} ({item.label}): {exc}",
                status if isinstance(status, int) else 500,
            ) from exc
        if not jpegs:
            raise RenderError(f"avatar {item.index} ({item.label}): the server sent no image")
        rendered = Rendered(item, tuple(jpegs), time.perf_counter() - started)
        out.append(rendered)
        if on_item is not None:
            on_item(len(out), len(items), rendered)
    return out


def render_gallery(
    user: str,
    pack: Pack,
    generate: Generate,
    out_dir: Path,
    *,
    target: str,
    token: str = DEFAULT_TOKEN,
    override: dict[str, Any] | None = None,
    on_item: Callable[[int, int, Rendered], None] | None = None,
):
    """Render every item of ``pack`` for ``user`` through ``generate`` and write the gallery
    (:func:`avatarforge.gallery.write_gallery`) into ``out_dir``; ``target`` says where the
    images came from, on the page. Returns the gallery's files and the rendered items."""
    from ..gallery import gallery_images, write_gallery

    items = pack.items(token, override)
    rendered = render_pack(items, generate, on_item)
    details = {
        "user": user,
        "pack": pack.name + (f": {pack.description}" if pack.description else ""),
        "pack file": pack.source,
        "rendered by": target,
        "avatars": f"{len(pack.styles)} styles x {len(pack.framings)} framings",
    }
    title = f"{user}: avatars of the {pack.name} pack"
    files = write_gallery(out_dir, gallery_images(rendered), title=title, details=details)
    return files, rendered
