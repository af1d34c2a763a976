"""Retryable conditions reach clients as 503 + Retry-After, and our clients retry them.

A model answers a condition that passes when the request is sent again (the shared base
restarting, a deadline, a model being loaded again) as Triton error UNAVAILABLE with a message
starting ``serving.bootstrap.RETRY_PREFIX``. Triton's KServe HTTP maps it to 503; Triton's
SageMaker front end answers every model error 400 (tritonserver 2.51, sagemaker_server.cc), so
the MME front turns it back into 503 with Retry-After; on SageMaker itself it arrives inside a
424 ModelError whose OriginalMessage is the container's body. Each client retries those (and
429 ModelNotReadyException) with backoff, and never a 400.

The scale model of tests/fixtures/mme.py answers UNAVAILABLE to the first n requests of a tag;
a small schema model here does the same for the local-triton client; the cloud client meets a
stand-in for the SageMaker runtime (AWS itself cannot run here) answering its wire format.
"""

from __future__ import annotations

import base64
import io
import json
import random
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest
from fixtures.mme import output_of, scale_request
from PIL import Image

from avatarforge.mme.front import (
    ERROR_TYPE_HEADER,
    EndpointError,
    Reply,
    error_reply,
    invoke_endpoint,
    mme_front,
    send_reply,
    serve_http,
)
from avatarforge.mme.loader import ModelUnavailableError
from avatarforge.mme.protocol import TARGET_MODEL_HEADER
from avatarforge.serving.bootstrap import RETRY_PREFIX


def _tag() -> int:
    return random.randint(1, 1 << 20)  # a fresh counter in the model: runs do not interfere


def _post(url: str, target: str, payload: dict) -> tuple[int, dict[str, str], dict]:
    request = urllib.request.Request(
        f"{url}/endpoints/local-mme/invocations",
        data=json.dumps(payload).encode(),
        headers={TARGET_MODEL_HEADER: target, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


@pytest.mark.integration
def test_a_retryable_model_error_is_a_503_with_retry_after_never_a_400(make_loader, mme_source):
    loader = make_loader(str(mme_source))
    with pytest.raises(ModelUnavailableError, match="unavailable: busy") as info:
        loader.invoke("alice.tar.gz", scale_request([-4, 1, _tag()]))
    assert info.value.status == 503
    with mme_front(loader) as url:
        status, headers, body = _post(url, "alice.tar.gz", scale_request([-4, 1, _tag()]))
        assert status == 503, body
        assert headers["Retry-After"] == "1"
        assert headers[ERROR_TYPE_HEADER] == "ServiceUnavailable"  # botocore retries it
        assert body["message"].startswith(RETRY_PREFIX)
        # the caller's mistake stays a 400, and the model's own failure is not retryable
        assert _post(url, "alice.tar.gz", scale_request([-1]))[0] == 400


@pytest.mark.integration
def test_the_mme_client_retries_a_503_and_never_a_400(make_loader, mme_source):
    loader = make_loader(str(mme_source))
    waits: list[float] = []
    with mme_front(loader) as url:
        tag = _tag()
        out = invoke_endpoint(
            url, "bob.tar.gz", scale_request([-4, 2, tag]),
            on_retry=lambda reason, seconds: waits.append(seconds),
        )  # fmt: skip
        assert output_of(out) == [-12.0, 6.0, 3.0 * tag]  # the third request was answered
        assert len(waits) == 2 and all(0 < w <= 8 for w in waits)
        waits.clear()
        with pytest.raises(EndpointError) as info:
            invoke_endpoint(
                url, "bob.tar.gz", scale_request([-1]), on_retry=lambda *a: waits.append(0)
            )
        assert info.value.status == 400 and waits == []
        # a retry budget shorter than the condition: the 503 reaches the caller
        with pytest.raises(EndpointError) as info:
            invoke_endpoint(url, "bob.tar.gz", scale_request([-4, 100, _tag()]), retry_s=0.5)
        assert info.value.status == 503 and info.value.code == "ServiceUnavailable"


@pytest.mark.integration
def test_a_loaded_model_that_triton_does_not_find_is_asked_again_never_a_400(
    make_loader, mme_source
):
    # Triton 2.51's core can miss a loaded model's name while another loads or unloads; its
    # SageMaker front end answers that 400 "Request for unknown model" (make reliability met
    # it once in 800 requests). The scale model answers those words on demand.
    loader = make_loader(str(mme_source))
    tag = _tag()
    out = loader.invoke("alice.tar.gz", scale_request([-6, 2, tag]))
    assert output_of(out) == [-12.0, 4.0, 2.0 * tag]  # alice's model (factor 2), third try
    with pytest.raises(ModelUnavailableError) as info:  # missed for longer: retry, not a 400
        loader.invoke("alice.tar.gz", scale_request([-6, 100, _tag()]))
    assert info.value.status == 503 and "did not find the loaded model" in str(info.value)


# A model with the served user model's inputs and output: a prompt "unavailable <n> <tag>"
# answers UNAVAILABLE to the first n requests of that tag, "invalid" answers INVALID_ARG.
RETRY_MODEL_PY = """\
import base64
import io

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image


class TritonPythonModel:
    def initialize(self, args):
        self.seen = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy()[0][0]
            words = prompt.decode().split()
            if words[0] == "invalid":
                code = pb_utils.TritonError.INVALID_ARG
                error = pb_utils.TritonError("invalid request: no", code)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            if words[0] == "unavailable":
                seen = self.seen[words[2]] = self.seen.get(words[2], 0) + 1
                if seen <= int(words[1]):
                    code = pb_utils.TritonError.UNAVAILABLE
                    error = pb_utils.TritonError("unavailable: restarting; retry", code)
                    responses.append(pb_utils.InferenceResponse(error=error))
                    continue
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
            image = np.array([[base64.b64encode(buf.getvalue())]], dtype=np.object_)
            out = pb_utils.Tensor("generated_image", image)
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
"""


@pytest.mark.integration
def test_the_local_triton_client_retries_unavailable_and_never_invalid(tmp_path):
    from fixtures.cloud import jpeg_model_config

    from avatarforge.serving import client
    from avatarforge.tritonserver.launch import tritonserver

    model = tmp_path / "repo" / "retry"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(jpeg_model_config(0.0))
    (model / "1" / "model.py").write_text(RETRY_MODEL_PY)
    waits: list[float] = []
    with tritonserver([tmp_path / "repo"], load=["retry"]) as server:
        jpegs = client.generate_jpegs(
            server.url, "retry", f"unavailable 2 {_tag()}",
            on_retry=lambda reason, seconds: waits.append(seconds),
        )  # fmt: skip
        assert len(jpegs) == 1 and jpegs[0].startswith(client.JPEG_MAGIC)
        assert len(waits) == 2
        waits.clear()
        with pytest.raises(client.ServingError, match="invalid request"):
            client.generate_jpegs(
                server.url, "retry", "invalid", on_retry=lambda *a: waits.append(0)
            )
        assert waits == []
        with pytest.raises(client.ServingError, match="unavailable: restarting"):
            client.generate_jpegs(server.url, "retry", f"unavailable 100 {_tag()}", retry_s=0.5)


def _jpeg_response() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, format="JPEG")
    data = [base64.b64encode(buf.getvalue()).decode()]
    return json.dumps({"outputs": [{"name": "generated_image", "data": data}]}).encode()


@pytest.fixture
def sagemaker_stand_in(monkeypatch):
    """A stand-in for the SageMaker runtime (AWS itself cannot run here): answers each
    InvokeEndpoint with the next scripted Reply, in SageMaker's wire format (the error code in
    x-amzn-ErrorType, ModelError's fields in the body); records the requests."""
    script: list[Reply] = []
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            send_reply(self, script.pop(0) if script else error_reply(500, "InternalFailure", "?"))

    with serve_http(Handler) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", url)
        for key, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x")):
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
        yield script, seen


def _model_error(container_body: dict) -> Reply:
    # what SageMaker answers when the container (Triton's SageMaker front end) answered 400
    original = json.dumps(container_body)
    return error_reply(
        424, "ModelError",
        f'Received client error (400) from primary with message "{original}". See ...',
        OriginalStatusCode=400, OriginalMessage=original,
    )  # fmt: skip


def test_the_cloud_client_retries_a_model_error_carrying_the_retry_prefix(sagemaker_stand_in):
    import boto3

    from avatarforge.cloud import EndpointError as CloudEndpointError
    from avatarforge.cloud import generate

    script, seen = sagemaker_stand_in
    session = boto3.session.Session(region_name="us-east-1")
    waits: list[float] = []
    retrying = _model_error({"error": RETRY_PREFIX + "the shared base restarted; retry"})
    script += [retrying, retrying, Reply(200, _jpeg_response())]
    jpegs = generate("mme", "alice", "p", session=session,
                     on_retry=lambda reason, seconds: waits.append(seconds))  # fmt: skip
    assert len(jpegs) == 1 and len(seen) == 3 and len(waits) == 2
    # a model error without the prefix, and a 400, are the caller's answer at once
    not_retried = error_reply(400, "ValidationError", RETRY_PREFIX + "not a model error")
    for reply in (_model_error({"error": "asked to fail"}), not_retried):
        seen.clear()
        script[:] = [reply, Reply(200, _jpeg_response())]
        with pytest.raises(CloudEndpointError):
            generate("mme", "alice", "p", session=session)
        assert len(seen) == 1
