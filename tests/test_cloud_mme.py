"""generate through boto3's sagemaker-runtime client, the local SageMaker runtime and the real
tritonserver (SageMaker front end), with TargetModels fetched from the deployment's models
prefix in moto S3.

The models are the small jpeg models of tests/fixtures/cloud.py (the served user model's inputs
and output, a colour per prompt; ``slow`` takes 2 s in ``initialize()``), the archives of
tests/fixtures/mme.py (``broken`` fails to load, ``evil`` escapes its folder), and no model at
all for ``nobody``. The runtime answers ModelNotReadyException while a TargetModel loads, as
SageMaker does on a user's first request.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request

import boto3
import pytest
from fixtures.cloud import prompt_color
from PIL import Image

from avatarforge.cloud import EndpointError, NoModelError, RetryPolicy, generate
from avatarforge.cloud.client import jpegs_from_response
from avatarforge.mme.generate import generate_request
from avatarforge.mme.protocol import TARGET_MODEL_HEADER

pytestmark = pytest.mark.integration


def _color(jpeg: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG"
        return image.convert("RGB").getpixel((8, 8))


def _close(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 3  # JPEG rounding


def _codes(runtime, target: str) -> list[str | int]:
    return [r.error_code or r.status for r in runtime.requests() if r.target_model == target]


def test_generate_returns_the_jpeg_bytes_the_server_sent(cloud_config, mme_runtime) -> None:
    runtime, loader = mme_runtime
    prompt = "a photo of <<TOK>> person as an astronaut"
    images = generate(cloud_config, "quick", prompt, gen_args={"num_images": 2, "seed": 3})
    assert len(images) == 2
    assert all(_close(_color(jpeg), prompt_color(prompt)) for jpeg in images)
    assert loader.loaded() == ["quick.tar.gz"]
    codes = _codes(runtime, "quick.tar.gz")
    assert codes[-1] == 200 and set(codes[:-1]) <= {"ModelNotReadyException"}
    # byte for byte what the endpoint answers (the same request, read raw, no boto3)
    request = urllib.request.Request(
        f"{runtime.url}/endpoints/{cloud_config.mme_endpoint_name}/invocations",
        data=json.dumps(generate_request(prompt, gen_args={"num_images": 2, "seed": 3})).encode(),
        headers={TARGET_MODEL_HEADER: "quick.tar.gz", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        raw = json.loads(answer.read())
    assert images == [base64.b64decode(t) for t in raw["outputs"][0]["data"]]


def test_model_not_ready_is_retried_with_backoff(cloud_config, mme_runtime) -> None:
    runtime, loader = mme_runtime
    # a budget shorter than the load: SageMaker's error reaches the caller, named
    with pytest.raises(EndpointError, match="ModelNotReadyException") as info:
        generate(cloud_config, "slow", "p", retry=RetryPolicy(model_loading_s=0.3))
    assert info.value.code == "ModelNotReadyException"
    waits: list[float] = []
    images = generate(
        cloud_config, "slow", "p", on_retry=lambda reason, seconds: waits.append(seconds)
    )
    assert _close(_color(images[0]), prompt_color("p"))
    codes = _codes(runtime, "slow.tar.gz")
    assert codes[-1] == 200 and codes.count("ModelNotReadyException") == len(codes) - 1 >= 2
    assert len(waits) >= 1 and all(0 < w <= RetryPolicy().backoff_max_s for w in waits)
    if len(waits) >= 3:  # exponential: later waits are longer (jitter stays within [c/2, c])
        assert waits[2] > waits[0]
    assert "slow.tar.gz" in loader.loaded()


def test_throttling_is_retried_by_botocore(cloud_config, mme_runtime) -> None:
    runtime, _ = mme_runtime
    generate(cloud_config, "quick", "warm")  # loaded: only throttling is left to retry
    runtime.throttle_next(2)
    standard = RetryPolicy(mode="standard", max_attempts=4)
    assert generate(cloud_config, "quick", "throttled", retry=standard)
    assert _codes(runtime, "quick.tar.gz")[-3:] == ["ThrottlingException"] * 2 + [200]
    runtime.throttle_next(5)
    with pytest.raises(EndpointError, match="ThrottlingException") as info:
        generate(cloud_config, "quick", "p", retry=RetryPolicy(mode="adaptive", max_attempts=2))
    assert info.value.code == "ThrottlingException"
    assert _codes(runtime, "quick.tar.gz")[-2:] == ["ThrottlingException"] * 2
    runtime.throttle_next(0)


def test_a_user_without_a_tarball_is_told_to_submit_first(cloud_config, mme_runtime) -> None:
    _, loader = mme_runtime
    with pytest.raises(NoModelError, match="submit a training job first") as info:
        generate(cloud_config, "nobody", "a photo of <<TOK>> person")
    assert f"{cloud_config.models_prefix}nobody.tar.gz" in str(info.value)
    # the endpoint's own answer, without a models prefix to check
    with pytest.raises(EndpointError, match="Failed to download model data") as info:
        generate(cloud_config.mme_endpoint_name, "nobody", "p", region="us-east-1")
    assert info.value.code == "ValidationError"
    # a tarball that exists but does not load is the endpoint's error, not "no model yet"
    with pytest.raises(EndpointError, match="broken on purpose") as info:
        generate(cloud_config, "broken", "p")
    assert info.value.code == "ModelError"
    with pytest.raises(EndpointError, match="path traversal"):
        generate(cloud_config, "evil", "p")
    assert loader.loaded() == []


def test_runtime_errors_are_sagemakers_through_botocore(cloud_config, mme_runtime) -> None:
    runtime, _ = mme_runtime
    client = boto3.client("sagemaker-runtime", endpoint_url=runtime.url)
    name = cloud_config.mme_endpoint_name
    generate(cloud_config, "quick", "warm")
    with pytest.raises(client.exceptions.ModelError) as info:
        client.invoke_endpoint(
            EndpointName=name, TargetModel="quick.tar.gz", Body=b'{"inputs": []}'
        )
    # botocore parsed the modeled fields of SageMaker's ModelError
    assert info.value.response["OriginalStatusCode"] == 400
    assert "prompt" in info.value.response["OriginalMessage"]
    with pytest.raises(client.exceptions.ValidationError, match="Target-Model header"):
        client.invoke_endpoint(EndpointName=name, Body=b"{}")
    with pytest.raises(client.exceptions.ValidationError, match="invalid TargetModel"):
        client.invoke_endpoint(EndpointName=name, TargetModel="../x.tar.gz", Body=b"{}")
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint nope of account"):
        client.invoke_endpoint(EndpointName="nope", TargetModel="quick.tar.gz", Body=b"{}")
    with pytest.raises(client.exceptions.ValidationError, match="use async-invocations"):
        client.invoke_endpoint(
            EndpointName=cloud_config.training_endpoint_name, TargetModel="q.tar.gz", Body=b"{}"
        )


@pytest.mark.smoke
def test_jpegs_from_response_refuses_what_is_not_a_jpeg() -> None:
    from avatarforge.cloud import ResponseError

    def body(*texts: str) -> bytes:
        return json.dumps({"outputs": [{"name": "generated_image", "data": list(texts)}]}).encode()

    jpeg = b"\xff\xd8\xff\xe0" + b"x" * 10
    assert jpegs_from_response(body(base64.b64encode(jpeg).decode())) == [jpeg]
    for bad, why in (
        (body(base64.b64encode(b"PNG...").decode()), "not a JPEG"),
        (body("!!not base64!!"), "not base64"),
        (body(), "no image"),
        (b'{"outputs": []}', "no 'generated_image' output"),
        (b"oops", "no 'generated_image' output"),
    ):
        with pytest.raises(ResponseError, match=why):
            jpegs_from_response(bad)
