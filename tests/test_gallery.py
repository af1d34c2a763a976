"""The gallery page, opened the way a person opens it: in a real browser (headless Chromium).

Chromium comes from Debian's packages (`apt-get install chromium`; .ci/run installs it). Here
without it these tests skip and say why; in CI (CI set) a missing Chromium is a failure.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatarforge.gallery import CSP, GalleryImage, write_gallery

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "gold": (230, 190, 20),
}
SIZES = [(96, 128), (128, 96), (64, 64), (120, 80)]
HOSTILE = '</p><script>document.title = "pwned"</script><img src=x alt=injected> & "quotes"'


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _images() -> list[GalleryImage]:
    out = []
    for i, ((name, colour), size) in enumerate(zip(COLOURS.items(), SIZES, strict=True)):
        style, framing = f"style-{i // 2}", f"framing-{i % 2}"
        prompt = f"a {name} portrait of <<TOK>> person" + (f" {HOSTILE}" if i == 3 else "")
        out.append(
            GalleryImage(
                file=f"{i:02d}-{style}-{framing}.jpg",
                jpeg=_jpeg(colour, size),
                title=f"{style} x {framing}",
                row=style,
                column=framing,
                prompt=prompt,
                negative_prompt="blurry, <b>bold</b>",
                gen_args={"steps": 4, "seed": i},
            )
        )
    return out


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery") / "alice"
    images = _images()
    files = write_gallery(out, images, title="alice: <avatars>", details={"user": "alice"})
    return files, images


def test_gallery_files(gallery):
    files, images = gallery
    assert sorted(p.name for p in files.folder.iterdir()) == sorted(
        [i.file for i in images] + ["index.html", "contact_sheet.png", "gallery.json"]
    )
    for path, image in zip(files.images, images, strict=True):
        assert path.read_bytes() == image.jpeg  # exactly as the server sent it
    index = json.loads(files.index.read_text())
    assert [i["prompt"] for i in index["images"]] == [i.prompt for i in images]
    assert [tuple(i["size"]) for i in index["images"]] == SIZES
    sheet = Image.open(files.sheet)
    assert sheet.width >= 2 * 192 and sheet.height >= 2 * 192  # 2 styles x 2 framings


def test_page_is_self_contained_and_escaped(gallery):
    files, _ = gallery
    page = files.html.read_text()
    assert f'content="{CSP}"' in page
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "<script" not in page and "<b>" not in page  # the prompts' markup is text
    assert html.escape(HOSTILE) in page
    assert not re.search(r"\b(href|url\()", page)  # nothing from outside the page


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail(
            "headless Chromium is missing in CI: .ci/run installs it (apt-get install chromium)"
        )
    pytest.skip("headless Chromium is not installed here (apt-get install chromium); CI runs this")


def _run_chromium(page: Path, tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# Added to a copy of the page only (and the page's CSP opened for it): after load, each
# <img>'s decode state and natural size, written into the DOM that --dump-dom prints.
PROBE = """<script>
addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify([...document.images].map(
    (i) => [i.complete, i.naturalWidth, i.naturalHeight]));
  document.body.append(pre);
});
</script>"""


def test_chromium_shows_every_image_decoded_at_its_size(gallery, tmp_path):
    files, _ = gallery
    page = files.html.read_text()
    probed = page.replace("script-src 'none'", "script-src 'unsafe-inline'").replace(
        "</body>", PROBE + "</body>"
    )
    copy = tmp_path / "probed.html"
    copy.write_text(probed)
    dom = _run_chromium(copy, tmp_path, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    decoded = json.loads(html.unescape(found.group(1)))
    assert decoded == [[True, w, h] for w, h in SIZES]


def test_chromium_shows_the_prompts_as_text(gallery, tmp_path):
    files, images = gallery
    dom = _run_chromium(files.html, tmp_path, "--dump-dom")  # the page as written: CSP on
    prompts = [html.unescape(p) for p in re.findall(r'<p class="prompt">(.*?)</p>', dom, re.S)]
    assert prompts == [i.prompt for i in images]
    assert "<title>alice: &lt;avatars&gt;</title>" in dom  # no injected script ran
    assert len(re.findall(r"<img\b", dom)) == len(images)  # and no injected <img>
    captions = re.findall(r"<h2>(.*?)</h2>", dom)
    assert captions == [i.title for i in images]


def test_chromium_screenshot_shows_the_images(gallery, tmp_path):
    files, _ = gallery
    shot = tmp_path / "shot.png"
    _run_chromium(files.html, tmp_path, f"--screenshot={shot}", "--window-size=1000,1600")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.std() > 20  # not a blank page
    for name, colour in COLOURS.items():
        near = (np.abs(pixels - np.array(colour)).max(axis=-1) < 40).sum()
        assert near > 3000, f"{name}: only {near} pixels of its colour on the screenshot"


@pytest.mark.integration
@pytest.mark.slow
def test_avatars_through_tritonserver_to_a_page_chromium_shows(
    packaged_users, tiny_base, tmp_path, monkeypatch
):
    """`avatarforge avatars` against the real tritonserver: one request per item of a shipped
    pack, the gallery holds the server's JPEGs byte for byte, and Chromium shows them all."""
    from typer.testing import CliRunner

    from avatarforge.cli import app
    from avatarforge.packs import load_pack
    from avatarforge.serving.client import generate_jpegs
    from avatarforge.serving.config import local_instance_env
    from avatarforge.serving.repository import build_repository
    from avatarforge.tritonserver.launch import tritonserver

    monkeypatch.setenv("AVATARFORGE_PACKS", str(tmp_path / "no-user-packs"))
    small = {"steps": 2, "height": 64, "width": 64}
    names = build_repository(tmp_path / "repo", [packaged_users["alice"]])
    env = local_instance_env(tiny_base.path, tmp_path / "shared")
    out = tmp_path / "gallery"
    with tritonserver([tmp_path / "repo"], load=["model_setup", *names], env=env) as server:
        result = CliRunner().invoke(
            app,
            ["avatars", "alice", "--pack", "professional", "--url", server.url,
             "--gen-args", json.dumps(small), "--out", str(out)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        item = load_pack("professional").items(override=small)[4]
        again = generate_jpegs(
            server.url, "alice", item.prompt, item.negative_prompt, item.gen_args
        )
    shown = sorted(out.glob("*.jpg"))
    assert len(shown) == 6
    assert shown[4].name == f"{item.stem}.jpg" and shown[4].read_bytes() == again[0]
    page = (out / "index.html").read_text()
    probed = page.replace("script-src 'none'", "script-src 'unsafe-inline'")
    copy = tmp_path / "probed.html"
    copy.write_text(probed.replace("</body>", PROBE + "</body>"))
    dom = _run_chromium(copy, tmp_path, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found and json.loads(html.unescape(found.group(1))) == [[True, 64, 64]] * 6
