"""The request contract, written once for people (docs/request.md, `avatarforge contract`) from the
schema; its curl and tritonclient examples run as written against the real tritonserver."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from fixtures.load import busy_cpu
from PIL import Image
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.generate import TINY_CPU_DEFAULTS, GenArgs
from avatarforge.serving import schema
from avatarforge.serving.config import local_instance_env
from avatarforge.serving.repository import build_repository
from avatarforge.tritonserver.launch import tritonserver

# what a request that leaves its size out gets from the tiny base on a CPU
TINY_CPU_SIZE = (TINY_CPU_DEFAULTS["width"], TINY_CPU_DEFAULTS["height"])


def code_block(markdown: str, language: str) -> str:
    (code,) = re.findall(rf"```{language}\n(.*?)```", markdown, re.S)
    return code


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the example exactly once"
    return text.replace(old, new)


def test_contract_states_every_input_output_and_gen_args_field():
    text = schema.contract_markdown()
    for spec in schema.INPUTS:
        required = "no" if spec.optional else "yes"
        assert f"| `{spec.name}` | `BYTES` | `[-1, 1]` | {required} |" in text
    assert "| `generated_image` | `BYTES` | `[-1, -1]` |" in text
    assert schema.ADAPTER.name not in text  # the shared base's own input: not for clients
    for f in dataclasses.fields(GenArgs):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{f.name}` |"))
        meta = f.metadata
        if meta["choices"]:
            assert all(f"`{c}`" in row for c in meta["choices"])
        else:
            assert f"{meta['ge']} – {meta['le']}" in row
    for alias, name in GenArgs.ALIASES.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`{alias}`" in row
    assert f"1 to {schema.MAX_BATCH_SIZE} rows" in text
    python = code_block(text, "python")
    assert "network_timeout=600.0" in python  # the first request can pass the default 60 s
    compile(python, "example.py", "exec")


def test_contract_command_prints_the_markdown():
    result = CliRunner().invoke(app, ["contract", "--markdown"])
    assert result.exit_code == 0, result.output
    assert result.output == schema.contract_markdown() + "\n"
    result = CliRunner().invoke(app, ["contract"])
    assert result.exit_code == 0 and "generated_image" in result.output


def test_docs_hold_the_contract_the_code_prints(repo_root):
    page = (repo_root / "docs" / "request.md").read_text()
    assert schema.contract_markdown() in page, "run: avatarforge contract --markdown"


@pytest.fixture(scope="module")
def server(packaged_users, tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    names = build_repository(tmp / "repo", [packaged_users["alice"]])
    with tritonserver(
        [tmp / "repo"], load=names, env=local_instance_env(tiny_base.path, tmp / "shared")
    ) as running:
        yield running


@pytest.mark.integration
def test_the_tritonclient_example_runs_as_written(server, tmp_path):
    # as written but for the URL: the steps and size it leaves out are the instance's, which
    # for the tiny base on a CPU fit its request timeout (before: 512 px, 30 steps, over 60 s
    # on a busy 2-core CPU; the test sent 64 px and 2 steps instead)
    code = code_block(schema.contract_markdown(), "python")
    code = replace_once(code, f'"{schema.EXAMPLE_URL}"', f'"{server.url}"')
    (tmp_path / "example.py").write_text(code)
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    written = sorted(p.name for p in tmp_path.glob("*.jpg"))
    assert written == ["alice-0-0.jpg", "alice-1-0.jpg"]  # two prompts, one image each
    for name in written:
        with Image.open(tmp_path / name) as image:
            assert image.format == "JPEG" and image.size == TINY_CPU_SIZE


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_the_curl_example_runs_as_written(server, tmp_path):
    command = code_block(schema.contract_markdown(), "bash")
    command = replace_once(command, schema.EXAMPLE_URL, server.url)  # and nothing else
    run = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / f"{schema.EXAMPLE_USER}.jpg") as image:
        assert image.format == "JPEG" and image.size == TINY_CPU_SIZE


@pytest.mark.integration
def test_what_the_readme_sends_is_served_by_a_busy_cpu(server):
    # the README's `avatarforge generate --url ... --user alice --prompt ...`: no gen_args,
    # two busy loops beside the server. Before: 512 px and 30 steps, over 60 s there (503 "the
    # server was busy"); now the tiny base on a CPU answers with its 256 px, 12-step default
    from avatarforge.serving import client

    with busy_cpu(2):
        started = time.monotonic()
        (image,) = client.generate(server.url, "alice", "an oil painting of <<TOK>> person")
        took = time.monotonic() - started
    assert image.size == TINY_CPU_SIZE
    print(f"\nthe README's request beside two busy loops: {took:.1f} s")


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


@pytest.mark.integration
def test_what_the_contract_says_is_refused_is_refused(server):
    url = f"http://{server.url}/v2/models/alice/infer"

    def text(name: str, value: str, shape: list[int]) -> dict:
        return {"name": name, "datatype": "BYTES", "shape": shape, "data": [value]}

    prompt = "a photo of <<TOK>> person"
    # shape [1] (no batch dimension): refused
    status, answer = _post(url, {"inputs": [text("prompt", prompt, [1])]})
    assert status == 400 and "shape" in answer["error"], answer
    # a bad gen_args field: an error naming the field, suggesting the closest name
    bad = text("gen_args", '{"num_inference_step": 2}', [1, 1])
    status, answer = _post(url, {"inputs": [text("prompt", prompt, [1, 1]), bad]})
    assert status >= 400 and "did you mean num_inference_steps (= steps)?" in answer["error"]
    bad = text("gen_args", '{"steps": 0}', [1, 1])
    status, answer = _post(url, {"inputs": [text("prompt", prompt, [1, 1]), bad]})
    assert status >= 400 and "gen_args.steps: must be >= 1 (got 0)" in answer["error"]


@pytest.mark.integration
def test_a_request_the_server_cannot_finish_in_time_is_refused_with_what_fits(server):
    # 150 steps at 1024 px: ~145 s of the tiny base on this CPU, more than the 60 s of the
    # request timeout. Before: each try ran 60 s and was answered 503 "the server was busy", and
    # clients sent it again. Now a try stops after a few steps with the pace it measured and
    # what fits; once two tries measured that pace, the request is refused before any work
    from avatarforge.serving import client

    client.generate(server.url, "alice", "a photo", gen_args={"steps": 1, "height": 64})  # up
    url = f"http://{server.url}/v2/models/alice/infer"
    body = {
        "inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["a photo"]},
            {"name": "gen_args", "datatype": "BYTES", "shape": [1, 1],
             "data": ['{"steps": 150, "height": 1024, "width": 1024}']},
        ]
    }  # fmt: skip
    for steps in (3, 1):  # its own first step and two timed; then the pace of the first try
        started = time.monotonic()
        status, answer = _post(url, body)
        assert status == 503 and f"stopped after {steps} of 150 denoising" in answer["error"]
        assert "busy" not in answer["error"] and "steps at this size" in answer["error"]
        assert time.monotonic() - started < 45  # not the whole 60 s
    started = time.monotonic()
    status, answer = _post(url, body)
    assert status == 400, answer
    message = answer["error"]
    assert message.startswith("invalid request: request: needs at least") and "steps at" in message
    assert "AVATARFORGE_SERVING_REQUEST_TIMEOUT_S" in message
    assert time.monotonic() - started < 5
