"""Real SD user packages through the real tritonserver's SageMaker MME front end.

Two users are packaged with ``package_user`` (alice from the ``trained_adapter`` fixture, bob
from a second short training run with another seed, so the two adapters really differ) into a
source folder, and the loader does what SageMaker does with a TargetModel: fetch
``<user>.tar.gz``, extract it to ``<root>/<hash>/model``, ``POST /models``, invoke with KServe v2
JSON, ``DELETE /models/<hash>``. The server's environment says where the shared files live and
where the base comes from, as an instance's would; the first user model starts the shared base.
Cold (first invoke of a TargetModel: fetch + extract + load + generate), warm invoke and unload
times are printed (run with -s); only their order is checked.

Tolerance, as in tests/test_triton.py: the in-process reference (``generate_images`` with
alice's adapter) goes through the same JPEG encoder as the served image, and the decoded images
may differ by at most 2 (of 255) per pixel, 0.05 on average.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fixtures.images import pixel_diff

from avatarforge.adapter import load_adapter, read_adapter
from avatarforge.base.pipeline import load_pipeline
from avatarforge.generate import GenArgs, from_jpeg_base64, generate_images, to_jpeg_base64
from avatarforge.mme import MMEConfig, MultiModelLoader, UnknownTargetModelError, model_hash
from avatarforge.mme.front import EndpointError, mme_front
from avatarforge.mme.generate import generate, generate_request, images_from_response
from avatarforge.serving.config import local_instance_env
from avatarforge.serving.package import package_user, upload_package
from avatarforge.serving.triton_config import sd_base_name
from avatarforge.tritonserver.sagemaker import MMEServer, sagemaker_triton

pytestmark = pytest.mark.integration

SMALL = {"steps": 2, "height": 64, "width": 64, "seed": 7}
ALICE, BOB = "alice.tar.gz", "bob.tar.gz"


@pytest.fixture(scope="module")
def prompt(trained_adapter) -> str:
    return f"a photo of {read_adapter(trained_adapter).token} person"


@pytest.fixture(scope="module")
def mme_sd_source(trained_adapter, bob_adapter, tiny_base, tmp_path_factory) -> Path:
    """The MME prefix as a folder: alice.tar.gz and bob.tar.gz, as `avatarforge package` writes."""
    out = tmp_path_factory.mktemp("mme-sd-source")
    for user, adapter in (("alice", trained_adapter), ("bob", bob_adapter)):
        package_user(user, adapter, out, base=tiny_base)
    return out


@pytest.fixture(scope="module")
def sd_sagemaker_server(tiny_base, tmp_path_factory):
    """tritonserver + SageMaker front end, the shared dir and base source in its environment."""
    tmp = tmp_path_factory.mktemp("triton-mme-sd")
    env = local_instance_env(tiny_base.path, tmp / "shared")
    with sagemaker_triton(tmp, extra_env=env) as server:
        print(f"\ntritonserver + SageMaker front end up in {server.start_seconds:.1f} s")
        yield server


@pytest.fixture(scope="module")
def sd_loader(sd_sagemaker_server: MMEServer, mme_sd_source: Path, tmp_path_factory):
    loader = MultiModelLoader(
        sd_sagemaker_server.sagemaker_url,
        str(mme_sd_source),
        tmp_path_factory.mktemp("opt-ml-models"),
        MMEConfig(max_loaded=8),
    )
    try:
        yield loader
    finally:
        loader.unload_all()


@pytest.fixture(scope="module")
def alice_reference(trained_adapter, tiny_base, prompt):
    """generate-local with alice's adapter, through the same JPEG encoding as the server."""
    pipe = load_pipeline(tiny_base, device="cpu")
    load_adapter(pipe, trained_adapter, tiny_base, "alice")
    image = generate_images(pipe, prompt, None, GenArgs.parse(SMALL))[0]
    return from_jpeg_base64(to_jpeg_base64(image))


def _invoke(loader: MultiModelLoader, target: str, prompt: str, args=SMALL):
    started = time.perf_counter()
    response = loader.invoke(target, generate_request(prompt, gen_args=args))
    return images_from_response(response), time.perf_counter() - started


def _ready(server: MMEServer, model: str) -> bool:
    """Loaded and not unloaded since, from the server's log: its HTTP API is off, as on
    SageMaker."""
    log = server.log_path.read_text(errors="replace")
    return log.rfind(f"successfully loaded '{model}'") > log.rfind(
        f"successfully unloaded '{model}'"
    )


def test_two_users_load_invoke_unload_and_reload(
    sd_loader, sd_sagemaker_server, tiny_base, prompt, alice_reference
):
    client = sd_loader.client
    # cold: the first invoke of a TargetModel fetches, extracts and loads it (alice's load also
    # starts the shared base); warm: the model is loaded
    (alice,), alice_cold = _invoke(sd_loader, ALICE, prompt)
    (bob,), bob_cold = _invoke(sd_loader, BOB, prompt)
    (alice_warm_image,), alice_warm = _invoke(sd_loader, ALICE, prompt)
    (_,), bob_warm = _invoke(sd_loader, BOB, prompt)
    loads = {t: sd_loader.load(t).load_seconds for t in (ALICE, BOB)}
    print(
        f"\ncold invoke: alice {alice_cold:.2f} s (load {loads[ALICE]:.2f} s, starts the base),"
        f" bob {bob_cold:.2f} s (load {loads[BOB]:.2f} s); "
        f"warm invoke: alice {alice_warm:.2f} s, bob {bob_warm:.2f} s"
    )
    assert alice_warm < alice_cold and bob_warm < bob_cold  # sanity only
    assert sd_loader.loaded() == [ALICE, BOB]

    assert alice.format == bob.format == "JPEG"
    assert alice.size == bob.size == (64, 64)
    max_diff, mean_diff = pixel_diff(alice, alice_reference)
    print(f"served alice vs generate-local: max abs diff {max_diff}, mean {mean_diff:.4f}")
    assert max_diff <= 2 and mean_diff < 0.05
    assert pixel_diff(alice_warm_image, alice)[0] <= 2
    assert pixel_diff(bob, alice)[1] > 1.0, "bob's adapter should change the image"

    # both registered with Triton's SageMaker front end under their hash; one shared base
    alice_hash, bob_hash = model_hash(ALICE), model_hash(BOB)
    assert client.get(alice_hash)["modelUrl"] == str(sd_loader.root / alice_hash / "model")
    assert client.get(bob_hash) is not None
    base = sd_base_name(tiny_base.content_hash)
    assert _ready(sd_sagemaker_server, base)

    started = time.perf_counter()
    assert sd_loader.unload(ALICE) is True
    unload_s = time.perf_counter() - started
    print(f"unload alice (DELETE /models/<hash>): {unload_s:.2f} s")
    assert client.get(alice_hash) is None
    assert not (sd_loader.root / alice_hash).exists()
    assert sd_loader.loaded() == [BOB]
    assert _ready(sd_sagemaker_server, base), "the shared base must outlive a user model"
    (bob_again,), _ = _invoke(sd_loader, BOB, prompt)
    assert pixel_diff(bob_again, bob)[0] <= 2

    # the next request for alice loads her again, with the same result
    (alice_again,), alice_reload = _invoke(sd_loader, ALICE, prompt)
    print(f"alice again after unload (reload + invoke): {alice_reload:.2f} s")
    assert sd_loader.loaded() == [BOB, ALICE]
    assert pixel_diff(alice_again, alice)[0] <= 2
    log = sd_sagemaker_server.log_path.read_text(errors="replace")
    assert log.count(f"successfully loaded '{base}'") == 1


@pytest.mark.smoke
def test_unknown_target_model_is_a_clear_not_found(sd_loader, prompt):
    with pytest.raises(UnknownTargetModelError, match="'carol.tar.gz' not found in"):
        sd_loader.invoke("carol.tar.gz", generate_request(prompt, gen_args=SMALL))
    # the same through a SageMaker-runtime-like front: HTTP 404 naming the TargetModel
    with mme_front(sd_loader) as url:
        with pytest.raises(EndpointError, match="carol.tar.gz") as info:
            generate(url, "carol.tar.gz", prompt, gen_args=SMALL)
        assert info.value.status == 404
        # and the front keeps serving the known users
        assert generate(url, BOB, prompt, gen_args=SMALL)[0].size == (64, 64)
    # Triton's own front end, asked for a hash it never loaded, answers 404 too
    body = json.dumps(generate_request(prompt, gen_args=SMALL)).encode()
    assert sd_loader.client.invoke(model_hash("carol.tar.gz"), "carol.tar.gz", body).status == 404
    assert "carol.tar.gz" not in sd_loader.loaded()


def test_user_package_from_an_s3_prefix(
    sd_sagemaker_server, mme_sd_source, s3_bucket, prompt, alice_reference, tmp_path
):
    target = "s3/alice.tar.gz"  # its own TargetModel: alice may be loaded from the folder
    upload_package(mme_sd_source / ALICE, f"s3://{s3_bucket}/mme/{target}")  # sha256 in the PUT
    loader = MultiModelLoader(
        sd_sagemaker_server.sagemaker_url, f"s3://{s3_bucket}/mme/", tmp_path / "models"
    )
    try:
        (image,), cold = _invoke(loader, target, prompt)
        print(f"\ncold invoke from s3:// (fetch + load + generate): {cold:.2f} s")
        assert pixel_diff(image, alice_reference)[0] <= 2
        with pytest.raises(UnknownTargetModelError, match=r"not found in s3://"):
            loader.invoke("bob.tar.gz", generate_request(prompt, gen_args=SMALL))
    finally:
        loader.unload_all()


def test_updated_package_is_served_after_reload(
    sd_loader, mme_sd_source, trained_adapter, bob_adapter, tiny_base, prompt
):
    # A user retrains and the same TargetModel is replaced; after an unload the next request
    # loads the new archive, to the same <root>/<hash>/model path as before: the shared base
    # must not keep answering with the adapter it cached for that path.
    (before,), _ = _invoke(sd_loader, ALICE, prompt)
    (bob,), _ = _invoke(sd_loader, BOB, prompt)
    assert pixel_diff(before, bob)[1] > 1.0
    try:  # published again as the packager publishes: one rename, its sha256 with it
        package_user("alice", bob_adapter, mme_sd_source, base=tiny_base)
        assert sd_loader.unload(ALICE)
        (after,), _ = _invoke(sd_loader, ALICE, prompt)
        assert pixel_diff(after, bob)[0] <= 2, "alice's old adapter was served after her update"
    finally:
        package_user("alice", trained_adapter, mme_sd_source, base=tiny_base)
        sd_loader.unload(ALICE)
