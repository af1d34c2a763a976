"""`avatarforge avatars USER --pack NAME`: a user's gallery from a style pack, rendered by the
served model; `avatarforge packs list|show`: the packs there are and what they ask for."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from .common import console, fail

TARGETS = (
    "give --url (tritonserver), --mme (the local MME, TargetModel USER.tar.gz) or --endpoint "
    "(a SageMaker multi-model endpoint)"
)

packs_app = typer.Typer(
    help="Style packs: named sets of prompt templates (styles x framings) for `avatars`.",
    no_args_is_help=True,
)


def _override(gen_args: str | None) -> dict:
    """--gen-args as a dict, each field checked (bad fields named before any request)."""
    from ..generate import GenArgs, canonical_fields
    from ..settings import ConfigError

    if not gen_args:
        return {}
    try:
        data = json.loads(gen_args)
    except ValueError as exc:
        fail(f"--gen-args: not valid JSON ({exc})")
    if not isinstance(data, dict):
        fail(f"--gen-args: must be a JSON object (got {type(data).__name__})")
    try:
        GenArgs.from_dict(data)
        return canonical_fields(data)
    except ConfigError as exc:
        fail(f"--gen-args: {exc}")


def user_token(user: str) -> str:
    """The token of the user's local adapter (build/users/USER/adapter), else the default."""
    from ..adapter import AdapterError, read_adapter
    from ..packs import DEFAULT_TOKEN
    from ..paths import build_dir

    adapter = build_dir() / "users" / user / "adapter"
    if adapter.is_dir():
        try:
            return read_adapter(adapter).token
        except AdapterError:
            pass
    return DEFAULT_TOKEN


def _pack(name: str):
    from ..packs import PackError, load_pack

    try:
        return load_pack(name)
    except PackError as exc:
        fail(str(exc))


def avatars(
    user: str = typer.Argument(..., help="the user whose served model renders the avatars"),
    pack: str = typer.Option(..., "--pack", help="style pack name (avatarforge packs list)"),
    url: str = typer.Option(None, "--url", help="tritonserver HTTP address, e.g. 127.0.0.1:8000"),
    mme: str = typer.Option(None, "--mme", help="the local MME front, e.g. http://127.0.0.1:8080"),
    target_model: str = typer.Option(
        None, "--target-model", help="with --mme: the TargetModel (default: USER.tar.gz)"
    ),
    endpoint: str = typer.Option(
        None, "--endpoint", help="a SageMaker multi-model endpoint name, e.g. avatarforge-mme"
    ),
    config: Path = typer.Option(
        None, "--config", help="deployment description (with --endpoint): region, models prefix"
    ),
    region: str = typer.Option(None, "--region", help="AWS region (with --endpoint)"),
    gen_args: str = typer.Option(
        None,
        "--gen-args",
        help='JSON merged into every avatar\'s gen_args last, e.g. \'{"steps": 20, "seed": 5}\'',
    ),
    token: str = typer.Option(
        None,
        "--token",
        help="the user's token in the prompts (default: from build/users/USER/adapter, "
        "else <<TOK>>)",
    ),
    out: Path = typer.Option(
        None, "--out", help="gallery folder (default: build/avatars/USER/PACK; replaced whole)"
    ),
) -> None:
    """Render a style pack for a user through the served model and write the gallery:
    index.html (self-contained, with every prompt), contact_sheet.png and the JPEGs."""
    from ..errors import AvatarforgeError
    from ..names import check_user_id
    from ..packs import render_gallery, targets
    from ..paths import build_dir

    check_user_id(user, field="USER")
    if sum(map(bool, (url, mme, endpoint))) != 1:
        fail(f"{TARGETS}, one of them", code=2)
    if target_model and not mme:
        fail("--target-model goes with --mme", code=2)
    chosen = _pack(pack)
    override = _override(gen_args)
    token = token or user_token(user)
    try:
        chosen.items(token, override)  # a bad combination is named before any request
    except AvatarforgeError as exc:
        fail(f"--gen-args: {exc}")
    if url:
        generate, where = targets.triton(url, user), f"tritonserver {url}, model {user}"
    elif mme:
        model = target_model or f"{user}.tar.gz"
        generate, where = targets.mme(mme, model), f"local MME {mme}, TargetModel {model}"
    else:
        from .cloud import endpoint_target

        generate, where = endpoint_target(endpoint, user, config, region)
    out = out or build_dir() / "avatars" / user / chosen.name
    n = len(chosen.styles) * len(chosen.framings)
    console.print(f"{n} avatars of the {chosen.name} pack for {user} from {where}")

    def done(i: int, total: int, r) -> None:
        console.print(f"  {i:>2}/{total} {r.item.label} ({r.seconds:.1f} s)", highlight=False)

    try:
        files, _ = render_gallery(
            user, chosen, generate, out, target=where, token=token, override=override, on_item=done
        )
    except AvatarforgeError as exc:
        fail(str(exc))
    console.print(f"gallery       [bold]{files.html}[/]\ncontact sheet [bold]{files.sheet}[/]")


@packs_app.command("list")
def packs_list() -> None:
    """The packs there are: shipped with avatarforge, and yours (which replace a shipped one
    of the same name)."""
    from ..packs import PackError, pack_files, user_packs_dir
    from ..packs.load import read_pack

    for name, found in pack_files().items():
        try:
            pack = read_pack(found)
        except PackError as exc:
            console.print(f"[red]{name:14}[/] invalid: {escape(str(exc))}", soft_wrap=True)
            continue
        where = "yours" if pack.user else "shipped"
        console.print(
            f"{name:14} {len(pack.styles)} styles x {len(pack.framings)} framings  ({where}) "
            f"{pack.description}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    console.print(f"your packs: {user_packs_dir()} (set AVATARFORGE_PACKS to move it)")


@packs_app.command("show")
def packs_show(
    name: str = typer.Argument(..., help="pack name"),
    token: str = typer.Option("<<TOK>>", "--token", help="the token put into the prompts"),
    gen_args: str = typer.Option(None, "--gen-args", help="JSON merged into every gen_args"),
) -> None:
    """Every avatar a pack asks for: prompt, negative prompt and gen_args (checks the pack)."""
    from ..errors import AvatarforgeError

    pack = _pack(name)
    try:
        items = pack.items(token, _override(gen_args))
    except AvatarforgeError as exc:
        fail(f"--gen-args: {exc}")
    console.print(f"{pack.name}: {pack.description} ({pack.source})", markup=False)
    for item in items:
        console.print(
            f"{item.stem}\n  prompt    {item.prompt}\n  negative  {item.negative_prompt}\n"
            f"  gen_args  {json.dumps(item.gen_args, sort_keys=True)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    app.command("avatars")(avatars)
    app.add_typer(packs_app, name="packs")
