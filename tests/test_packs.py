"""Style packs: the shipped ones, the user's folder, every malformed field named, rendering."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.generate import GenArgs
from avatarforge.packs import (
    DEFAULT_TOKEN,
    PackError,
    RenderError,
    UnknownPackError,
    load_pack,
    pack_files,
    parse_pack,
    render_pack,
    user_packs_dir,
)
from avatarforge.settings import ConfigError

runner = CliRunner()

GOOD = """
description = "two looks"
[defaults]
negative_prompt = "blurry"
gen_args = { steps = 20, seed = 4 }
[[styles]]
name = "oil"
prompt = "an oil painting of {token} person, {framing}"
negative_prompt = "photo"
gen_args = { guidance_scale = 9.0 }
[[styles]]
name = "photo"
prompt = "a photo of {token} person"
[[framings]]
name = "head"
text = "head and shoulders"
[[framings]]
name = "tall"
text = "upper body"
gen_args = { height = 640, steps = 25 }
"""


@pytest.fixture
def user_packs(tmp_path, monkeypatch):
    folder = tmp_path / "my-packs"
    folder.mkdir()
    monkeypatch.setenv("AVATARFORGE_PACKS", str(folder))
    return folder


def test_shipped_packs_load_and_ask_for_valid_requests(monkeypatch, tmp_path):
    monkeypatch.setenv("AVATARFORGE_PACKS", str(tmp_path / "none"))
    assert {"classic", "professional"} <= set(pack_files())
    for name in pack_files():
        pack = load_pack(name)
        assert not pack.user and pack.description
        items = pack.items()
        assert len(items) == len(pack.styles) * len(pack.framings) >= 4
        for item in items:
            assert f"{DEFAULT_TOKEN} person" in item.prompt
            assert item.negative_prompt
            GenArgs.from_dict(item.gen_args)  # every request is one the server takes
        assert len({i.stem for i in items}) == len(items)
    assert len(load_pack("classic").items()) == 12


def test_items_merge_prompts_and_gen_args_in_order():
    pack = parse_pack(GOOD, "mine")
    items = pack.items("<<sks>>", {"seed": 9})
    assert [i.stem for i in items] == [
        "00-oil-head",
        "01-oil-tall",
        "02-photo-head",
        "03-photo-tall",
    ]
    oil_tall = items[1]
    assert oil_tall.prompt == "an oil painting of <<sks>> person, upper body"
    assert items[2].prompt == "a photo of <<sks>> person, head and shoulders"  # appended
    assert oil_tall.negative_prompt == "blurry, photo"
    assert items[2].negative_prompt == "blurry"
    # defaults < style < framing < override
    assert oil_tall.gen_args == {**GenArgs().to_dict(), "steps": 25, "seed": 9,
                                 "guidance_scale": 9.0, "height": 640}  # fmt: skip
    assert items[2].gen_args["steps"] == 20 and items[2].gen_args["guidance_scale"] == 7.5
    with pytest.raises(ConfigError, match="gen_args.height: must be a multiple of 8"):
        pack.items(override={"height": 100})


PHOTO = "a photo of {token} person"


def swap(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


MALFORMED = [
    ("description = ", "not valid TOML"),
    ('descripton = "x"\n' + GOOD.split("\n", 2)[2],
     "descripton: unknown field (did you mean 'description'?"),
    (swap(f'prompt = "{PHOTO}"', 'promt = "x"'),
     "styles[1].promt: unknown field (did you mean 'prompt'?"),
    (swap(f'prompt = "{PHOTO}"', ""), "styles[1].prompt: missing"),
    (swap(PHOTO, "a photo of someone"), "styles[1].prompt: must name the person with {token}"),
    (swap(PHOTO, "a photo of {token} {person}"), "styles[1].prompt: unknown placeholder {person}"),
    (swap(PHOTO, "a photo of {token person"), "styles[1].prompt: "),
    # only plain {name} fields: a width of 2e9 was a MemoryError, !r:^9..9 a ValueError traceback
    (swap(PHOTO, "a photo of {token} person {token:>2000000000}"),
     "styles[1].prompt: {token:>2000000000}: only plain {token} or {framing}"),
    (swap(PHOTO, "{token} with {framing!r:^" + "9" * 30 + "}"),
     "styles[1].prompt: {framing!r:^999999999999999999999999999999}: only plain"),
    (swap(PHOTO, "a photo of {token} {token!s}"), "styles[1].prompt: {token!s}: only plain"),
    (swap(PHOTO, "{token} {token.upper}"), "unknown placeholder {token.upper}"),
    (swap(PHOTO, "{token} {token[0]}"), "unknown placeholder {token[0]}"),
    (swap("height = 640", "height = 100"),
     "framings[1].gen_args: gen_args.height: must be a multiple of 8 (got 100)"),
    (swap("guidance_scale = 9.0", "guidance = 9.0"),
     "styles[0].gen_args: gen_args: unknown field(s) guidance"),
    (swap("steps = 20", "steps = 0"), "defaults.gen_args: gen_args.steps: must be >= 1"),
    (swap('name = "photo"', 'name = "oil"'), "styles[1].name: 'oil' is used twice"),
    (swap('name = "photo"', 'name = "Big Photo"'), "styles[1].name: 'Big Photo': use lowercase"),
    (swap('negative_prompt = "photo"', "negative_prompt = 3"),
     "styles[0].negative_prompt: must be text"),
    (GOOD.split("[[framings]]")[0], "framings: missing"),
    (swap("[defaults]", "defaults = 3\n[other]"), "defaults: must be a table"),
    ("\n".join([GOOD] + [f'[[framings]]\nname = "f{i}"\ntext = "t"' for i in range(40)]),
     "a pack may make at most 64"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), MALFORMED)
def test_malformed_packs_name_the_file_and_field(text, message):
    with pytest.raises(PackError) as exc:
        parse_pack(text, "mine", source="my-packs/mine.toml")
    assert str(exc.value).startswith("my-packs/mine.toml: "), exc.value
    assert message in str(exc.value)


def test_pack_name_is_checked():
    with pytest.raises(PackError, match="pack name 'My Pack'"):
        parse_pack(GOOD, "My Pack")


def test_user_packs_folder_adds_and_replaces(user_packs):
    assert user_packs_dir() == user_packs
    (user_packs / "team.toml").write_text(GOOD)
    (user_packs / "classic.toml").write_text(GOOD.replace("two looks", "our classic"))
    assert load_pack("team").user
    replaced = load_pack("classic")
    assert replaced.user and replaced.description == "our classic"
    assert replaced.source == str(user_packs / "classic.toml")


def test_user_packs_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("AVATARFORGE_PACKS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_packs_dir() == tmp_path / "avatarforge" / "packs"


def test_unknown_pack_suggests(user_packs):
    with pytest.raises(UnknownPackError) as exc:
        load_pack("clasic")
    assert "did you mean 'classic'?" in str(exc.value)
    assert str(user_packs) in str(exc.value)


def test_render_pack_sends_each_item_and_names_a_failure():
    items = parse_pack(GOOD, "mine").items()
    sent = []

    def generate(prompt, negative, gen_args):
        sent.append((prompt, negative, gen_args))
        return [b"\xff\xd8\xff jpeg"]

    done = []
    rendered = render_pack(items, generate, lambda i, n, r: done.append((i, n)))
    assert sent == [(i.prompt, i.negative_prompt, i.gen_args) for i in items]
    assert [r.jpegs for r in rendered] == [(b"\xff\xd8\xff jpeg",)] * 4
    assert done == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def failing(prompt, negative, gen_args):
        if "upper body" in prompt:
            raise ConnectionRefusedError("connection refused")
        return [b"x"]

    with pytest.raises(RenderError, match=r"avatar 1 \(oil x tall\): connection refused"):
        render_pack(items, failing)
    with pytest.raises(RenderError, match="sent no image"):
        render_pack(items, lambda *a: [])


def test_cli_packs_list_and_show(user_packs):
    (user_packs / "team.toml").write_text(GOOD)
    (user_packs / "broken.toml").write_text("styles = 3")
    result = runner.invoke(app, ["packs", "list"])
    assert result.exit_code == 0, result.output
    assert "classic" in result.output and "team" in result.output and "(yours)" in result.output
    assert "broken" in result.output and "invalid" in result.output
    result = runner.invoke(app, ["packs", "show", "team", "--token", "<<sks>>"])
    assert result.exit_code == 0, result.output
    assert "an oil painting of <<sks>> person, upper body" in result.output
    result = runner.invoke(app, ["packs", "show", "team", "--gen-args", '{"stepz": 3}'])
    assert result.exit_code == 1 and "stepz: did you mean steps?" in result.output


def test_cli_avatars_refuses_before_any_request(user_packs):
    result = runner.invoke(app, ["avatars", "alice", "--pack", "clasic", "--url", "127.0.0.1:1"])
    assert result.exit_code == 1 and "did you mean 'classic'?" in result.output
    result = runner.invoke(app, ["avatars", "alice", "--pack", "classic"])
    assert result.exit_code == 2 and "--url" in result.output
    args = ["avatars", "alice", "--pack", "classic", "--url", "127.0.0.1:1"]
    result = runner.invoke(app, [*args, "--gen-args", '{"height": 100}'])
    assert result.exit_code == 1 and "gen_args.height: must be a multiple of 8" in result.output
    result = runner.invoke(app, ["avatars", "../x", "--pack", "classic", "--url", "127.0.0.1:1"])
    assert result.exit_code != 0 and "not a valid user id" in result.output


def test_cli_avatars_through_the_mme_target(user_packs, tmp_path, monkeypatch):
    """The MME target sends each item to TargetModel USER.tar.gz (the client itself is tested
    with the MME); the gallery is written from what it answers."""
    import io

    from PIL import Image

    import avatarforge.mme.generate as mme_generate

    calls = []

    def fake(url, target_model, prompt, negative, gen_args, *, timeout):
        calls.append((url, target_model, prompt, gen_args["steps"]))
        buf = io.BytesIO()
        Image.new("RGB", (gen_args["width"], gen_args["height"]), (200, 40, 40)).save(buf, "JPEG")
        return [buf.getvalue()]

    monkeypatch.setattr(mme_generate, "generate_jpegs", fake)
    (user_packs / "team.toml").write_text(GOOD)
    out = tmp_path / "gallery"
    result = runner.invoke(
        app,
        ["avatars", "alice", "--pack", "team", "--mme", "http://127.0.0.1:9", "--out", str(out),
         "--gen-args", '{"steps": 3}'],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [c[:2] for c in calls] == [("http://127.0.0.1:9", "alice.tar.gz")] * 4
    assert {c[3] for c in calls} == {3}
    assert (out / "index.html").is_file() and (out / "contact_sheet.png").is_file()
    assert sorted(p.name for p in out.glob("*.jpg")) == [
        "00-oil-head.jpg", "01-oil-tall.jpg", "02-photo-head.jpg", "03-photo-tall.jpg"
    ]  # fmt: skip
    assert Image.open(out / "01-oil-tall.jpg").size == (512, 640)


def test_cli_avatars_through_an_endpoint(user_packs, tmp_path, monkeypatch):
    """--endpoint goes through the cloud client (TargetModel USER.tar.gz, its region); its
    errors (here: no model yet) stop the run with the item named."""
    import io

    from PIL import Image

    import avatarforge.cloud as cloud
    from avatarforge.cloud import NoModelError

    calls = []

    def fake(endpoint, user, prompt, negative, gen_args, *, region, models_prefix, on_retry):
        calls.append((endpoint, user, region))
        if len(calls) > 2:
            raise NoModelError(f"{user} has no model yet: submit a training job first")
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 120, 200)).save(buf, "JPEG")
        return [buf.getvalue()]

    monkeypatch.setattr(cloud, "generate", fake)
    (user_packs / "team.toml").write_text(GOOD)
    args = ["avatars", "alice", "--pack", "team", "--endpoint", "af-mme", "--region", "eu-west-1",
            "--out", str(tmp_path / "g")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert calls[0] == ("af-mme", "alice", "eu-west-1")
    assert "avatar 2 (photo x head): alice has no model yet" in result.output
    assert not (tmp_path / "g").exists()  # nothing half-written
