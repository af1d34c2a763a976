"""Style packs: named sets of prompt templates (styles x framings) rendered as a user's gallery.

- :mod:`.model`    Pack, Style, Framing and the items (prompt, negative prompt, gen_args) they make
- :mod:`.load`     packs shipped as package data and in the user's pack folder, checked on read
- :mod:`.render`   one request per item through the user's served model (a ``Generate``)
- :mod:`.targets`  a ``Generate`` for tritonserver, the local MME or a SageMaker endpoint

``avatarforge avatars USER --pack NAME`` (:mod:`avatarforge.cli.avatars`) renders a pack and
writes the gallery (:mod:`avatarforge.gallery`: contact sheet + one self-contained page).
"""

from .load import PackError, UnknownPackError, load_pack, pack_files, parse_pack, user_packs_dir
from .model import DEFAULT_TOKEN, Framing, Pack, PackItem, Style
from .render import Generate, Rendered, RenderError, render_gallery, render_pack

__all__ = [
    "DEFAULT_TOKEN",
    "Framing",
    "Generate",
    "Pack",
    "PackError",
    "PackItem",
    "RenderError",
    "Rendered",
    "Style",
    "UnknownPackError",
    "load_pack",
    "pack_files",
    "parse_pack",
    "render_gallery",
    "render_pack",
    "user_packs_dir",
]
