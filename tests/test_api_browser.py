"""The API's web page in a real browser, on the whole local stack: headless Chromium (Debian's
package, as the gallery tests) drives the page over the DevTools protocol (its pipe: no
websocket library), drops 10 real sample selfies into it, starts the training, waits for the
real training service to finish on the tiny base, and checks what a person would see: the
preprocessing contact sheet with reasons, the progress, the style pack's gallery, every image
decoded. The API runs under uvicorn on loopback in front of `make demo-cloud`'s stack (moto,
the async training endpoint, tritonserver's MME).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
from fixtures.jobs import stack_service
from test_gallery import _chromium

from avatarforge.api import ApiConfig, ApiService, create_app, hash_key, new_key
from avatarforge.demos.cloud import local_stack
from avatarforge.netutil import free_port
from avatarforge.serving.config import local_instance_env
from avatarforge.testing.samples import write_samples

SMALL = {"steps": 2, "height": 64, "width": 64, "seed": 3}


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4, JSON
    messages ending in NUL), attached to one page."""

    def __init__(self, chromium: str, profile) -> None:
        import subprocess

        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes answers
            high_r, high_w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1200,1600", "about:blank"],
            preexec_fn=fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session or getattr(self, "session", None):
            message["sessionId"] = session or self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._in, 1 << 16)
                assert chunk, "Chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer["error"]
                return answer["result"]

    def js(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
            time.sleep(0.5)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._out)
        os.close(self._in)


@pytest.fixture
def served_api(tiny_base, tmp_path, monkeypatch):
    """The API under uvicorn on loopback, on the local stack with the real training service
    (FIXTURE_TRAIN on the tiny base); yields (url, key)."""
    import uvicorn

    monkeypatch.setenv("AVATARFORGE_PACKS", str(tmp_path / "no-user-packs"))
    monkeypatch.setenv("AVATARFORGE_API_WEBHOOK_SECRET", "w" * 40)
    service = stack_service(tiny_base.path, tmp_path)
    env = local_instance_env(tiny_base.path, tmp_path / "mme-shared")
    key = new_key()
    settings = ApiConfig.from_dict(
        {"keys": [{"name": "page", "sha256": hash_key(key), "namespace": "page"}]}
    )
    with local_stack(env, tmp_path / "stack", service=service) as stack:
        api = ApiService(
            stack.config, settings, invoke_timeout_s=600, mme_sagemaker_url=stack.sagemaker_url
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(api), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}", key
        finally:
            server.should_exit = True
            thread.join(30)


def _page_calls(script: str) -> set[tuple[str, str]]:
    """(method, path) of each api("METHOD", <path expression>, ...) call in the page's script;
    a part of the path that is not a string literal (encodeURIComponent(...)) becomes {}."""
    calls = set()
    for match in re.finditer(r'\bapi\("([A-Z]+)", ', script):
        depth, end = 0, match.end()
        while depth or script[end] not in ",)":  # the argument, up to its own comma
            depth += {"(": 1, ")": -1}.get(script[end], 0)
            end += 1
        parts = script[match.end() : end].split(" + ")
        path = "".join(p.strip('"') if p.startswith('"') else "{}" for p in parts)
        if path != "{}":  # a whole path the API handed out (view.contact_sheet): its own
            calls.add((match.group(1).lower(), path))
    return calls


def test_every_call_the_page_makes_is_a_route_of_the_app() -> None:
    """The page and the API drift apart without a browser noticing until someone clicks: each
    api(...) call in app.js must name a method and path the app's OpenAPI document has."""
    from importlib import resources

    from avatarforge.deploy.config import DeployConfig

    script = resources.files("avatarforge").joinpath("data", "api_web", "app.js").read_text()
    calls = _page_calls(script)
    assert len(calls) >= 5, calls  # packs, photos, trainings (new, view), predictions
    app = create_app(ApiService(DeployConfig(bucket="page-bucket"), ApiConfig()), watch=False)
    routes = {
        (method, re.sub(r"\{[^}]+\}", "{}", path))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    assert calls <= routes, calls - routes


@pytest.mark.integration
@pytest.mark.slow
def test_the_page_takes_selfies_to_a_gallery_in_chromium(served_api, tmp_path) -> None:
    url, key = served_api
    photos = write_samples(tmp_path / "photos")[:10]  # "drop 10-12 selfies"
    browser = DevTools(_chromium(), tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url + "/")
        loaded = "document.readyState === 'complete' && typeof $ === 'function'"
        browser.wait(loaded, 30, "the page")
        browser.js(
            f"""$("key").value = {json.dumps(key)};
            $("key").dispatchEvent(new Event("change"));
            $("user").value = "astro";
            $("gen-args").value = {json.dumps(json.dumps(SMALL))};"""
        )
        browser.wait("[...$('pack').options].some(o => o.value === 'professional')", 20, "packs")
        browser.js("$('pack').value = 'professional'")

        # drop the selfies: the file input gets them as a person's file picker gives them
        files = browser.call("Runtime.evaluate", expression="document.getElementById('files')")[
            "result"
        ]["objectId"]
        browser.call("DOM.setFileInputFiles", files=[str(p) for p in photos], objectId=files)
        status = browser.wait(
            "/stored for astro/.test($('upload-status').textContent) && "
            "$('upload-status').textContent",
            60,
            "the upload",
        )
        assert status.startswith(f"{len(photos)} photo(s)")

        browser.js("$('train').click()")
        seen_states = set()
        deadline = time.monotonic() + 900
        while True:
            state = browser.js("$('state').textContent")
            seen_states.add(state)
            if state in ("succeeded", "failed"):
                break
            assert time.monotonic() < deadline, f"training still {state}"
            time.sleep(1)
        assert state == "succeeded", browser.js("$('failure').textContent")
        assert seen_states & {"queued", "running"}
        assert browser.js("$('progress').value") == 1

        # preprocessing: the contact sheet decoded, and a line per photo (kept or why not)
        sheet = browser.wait(
            "$('sheet').complete && $('sheet').naturalWidth > 0 && "
            "[$('sheet').naturalWidth, $('sheet').naturalHeight]",
            30,
            "the contact sheet",
        )
        assert sheet[0] > 200 and sheet[1] > 200
        reasons = browser.js("[...$('photo-reasons').children].map(li => li.textContent)")
        assert len(reasons) >= len(photos) - 1 and any(r.startswith("kept ") for r in reasons)

        # the gallery: every avatar of the pack, each image decoded at the asked size
        browser.wait("/avatars$/.test($('gallery-status').textContent)", 600, "the gallery")
        decoded = browser.js(
            "[...document.querySelectorAll('#gallery img')]"
            ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert decoded == [[True, 64, 64]] * 6
        captions = browser.js("[...document.querySelectorAll('figcaption')].map(c => c.innerText)")
        assert all("<<TOK>>" in c for c in captions)
    finally:
        browser.close()
