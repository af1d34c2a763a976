"""The MME emulation through the real tritonserver with its SageMaker front end."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import boto3
import pytest
from fixtures.mme import USERS, output_of, scale_request

from avatarforge.mme import (
    InvalidTargetModelError,
    ModelLoadError,
    UnknownTargetModelError,
    model_hash,
)
from avatarforge.mme.front import EndpointError, invoke_endpoint, mme_front
from avatarforge.mme.loader import check_target_model
from avatarforge.safe_tar import UnsafeArchiveError
from avatarforge.storage import publish


def test_target_model_names_and_hashes() -> None:
    assert check_target_model("alice.tar.gz") == "alice.tar.gz"
    assert check_target_model("team/alice-2.tar.gz") == "team/alice-2.tar.gz"
    for bad in ("../alice.tar.gz", "/abs.tar.gz", "a//b.tar.gz", "alice.zip", "", ".tar.gz"):
        with pytest.raises(InvalidTargetModelError, match="invalid TargetModel"):
            check_target_model(bad)
    assert model_hash("alice.tar.gz") == model_hash("alice.tar.gz")
    assert model_hash("alice.tar.gz") != model_hash("bob.tar.gz")
    assert len(model_hash("x.tar.gz")) == 32


@pytest.mark.integration
def test_load_two_invoke_both_unload_one_and_invoke_again(make_loader, mme_source: Path) -> None:
    loader = make_loader(str(mme_source))
    client = loader.client
    for user, factor in USERS.items():
        if user == "carol":
            continue
        assert output_of(loader.invoke(f"{user}.tar.gz", scale_request([1, 2]))) == [
            factor,
            2 * factor,
        ]
    assert loader.loaded() == ["alice.tar.gz", "bob.tar.gz"]
    # what SageMaker would see: both registered under their hash, files under <root>/<hash>/model
    alice_hash = model_hash("alice.tar.gz")
    assert client.get(alice_hash)["modelUrl"] == str(loader.root / alice_hash / "model")
    assert (loader.root / alice_hash / "model" / "alice" / "1" / "model.py").is_file()
    assert not (loader.root / alice_hash / "archive.tar.gz").exists()

    assert loader.unload("alice.tar.gz") is True
    assert loader.unload("alice.tar.gz") is False
    assert client.get(alice_hash) is None
    assert not (loader.root / alice_hash).exists()
    assert loader.loaded() == ["bob.tar.gz"]

    # invoking it again loads it again, as SageMaker does on the next request
    assert output_of(loader.invoke("alice.tar.gz", scale_request([3]))) == [6.0]
    assert loader.loaded() == ["bob.tar.gz", "alice.tar.gz"]


@pytest.mark.integration
def test_least_recently_used_is_evicted_at_the_limit(make_loader, mme_source: Path) -> None:
    loader = make_loader(str(mme_source), max_loaded=2)
    loader.invoke("alice.tar.gz", scale_request([1]))
    loader.invoke("bob.tar.gz", scale_request([1]))
    loader.invoke("alice.tar.gz", scale_request([1]))  # alice is now the most recent
    assert output_of(loader.invoke("carol.tar.gz", scale_request([1]))) == [5.0]
    assert loader.loaded() == ["alice.tar.gz", "carol.tar.gz"]
    assert loader.client.get(model_hash("bob.tar.gz")) is None
    assert not (loader.root / model_hash("bob.tar.gz")).exists()
    assert sorted(p.name for p in loader.root.iterdir()) == sorted(
        model_hash(t) for t in ("alice.tar.gz", "carol.tar.gz")
    )
    # bob comes back on demand and pushes out alice, now the least recently used
    assert output_of(loader.invoke("bob.tar.gz", scale_request([2]))) == [6.0]
    assert loader.loaded() == ["carol.tar.gz", "bob.tar.gz"]


@pytest.mark.integration
def test_loads_from_s3_prefix(make_loader, mme_source: Path, s3_bucket: str) -> None:
    for user in ("alice", "bob"):  # as the packager publishes: the sha256 in the same PUT
        publish(mme_source / f"{user}.tar.gz", f"s3://{s3_bucket}/mme/{user}.tar.gz")
    loader = make_loader(f"s3://{s3_bucket}/mme/")
    assert output_of(loader.invoke("bob.tar.gz", scale_request([1.5]))) == [4.5]
    with pytest.raises(UnknownTargetModelError, match="'carol.tar.gz' not found in s3://"):
        loader.invoke("carol.tar.gz", scale_request([1]))
    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 2


@pytest.mark.integration
def test_unknown_and_invalid_target_models(make_loader, mme_source: Path) -> None:
    loader = make_loader(str(mme_source))
    with pytest.raises(UnknownTargetModelError, match="'dave.tar.gz' not found in"):
        loader.invoke("dave.tar.gz", scale_request([1]))
    with pytest.raises(InvalidTargetModelError):
        loader.invoke("../alice.tar.gz", scale_request([1]))
    assert loader.loaded() == []
    assert list(loader.root.iterdir()) == []


@pytest.mark.integration
def test_hostile_archive_is_refused_before_triton_sees_it(
    make_loader, mme_source: Path, sagemaker_server
) -> None:
    loader = make_loader(str(mme_source))
    log_before = sagemaker_server.log_path.read_text(errors="replace")
    with pytest.raises(UnsafeArchiveError, match="path traversal"):
        loader.load("evil.tar.gz")
    assert loader.loaded() == [] and list(loader.root.iterdir()) == []
    assert not (loader.root.parent / "evil.txt").exists()
    assert loader.client.get(model_hash("evil.tar.gz")) is None
    log_after = sagemaker_server.log_path.read_text(errors="replace")
    assert "evil" not in log_after[len(log_before) :]


@pytest.mark.integration
def test_load_failure_surfaces_tritons_message(make_loader, mme_source: Path) -> None:
    loader = make_loader(str(mme_source))
    with pytest.raises(ModelLoadError, match="broken on purpose") as info:
        loader.invoke("broken.tar.gz", scale_request([1]))
    assert "Triton could not load 'broken.tar.gz'" in str(info.value)
    # the client gets the reason and a reference; the traceback and server paths stay in the log
    message = str(info.value)
    assert "At:" not in message and "model.py(" not in message
    assert str(loader.root) not in message and str(mme_source) not in message
    assert re.search(r"reference [0-9a-f]{12} in the server's log", message)
    assert loader.loaded() == [] and list(loader.root.iterdir()) == []
    # the server keeps serving, and the failed name can be tried again (not stuck in Triton)
    assert output_of(loader.invoke("alice.tar.gz", scale_request([1]))) == [2.0]
    with pytest.raises(ModelLoadError, match="broken on purpose"):
        loader.load("broken.tar.gz")


@pytest.mark.integration
def test_runtime_front_routes_target_model_header(make_loader, mme_source: Path) -> None:
    loader = make_loader(str(mme_source), max_loaded=1)
    with mme_front(loader) as url:
        started = time.perf_counter()
        out = invoke_endpoint(url, "carol.tar.gz", scale_request([1, 1]))
        assert output_of(out) == [5.0, 5.0]
        assert time.perf_counter() - started < 30
        assert output_of(invoke_endpoint(url, "alice.tar.gz", scale_request([4]))) == [8.0]
        assert loader.loaded() == ["alice.tar.gz"]
        with pytest.raises(EndpointError, match="not found") as info:
            invoke_endpoint(url, "nobody.tar.gz", scale_request([1]))
        assert info.value.status == 404
        with pytest.raises(EndpointError, match="path traversal") as info:
            invoke_endpoint(url, "evil.tar.gz", scale_request([1]))
        assert info.value.status == 424
        with pytest.raises(EndpointError, match="INPUT") as info:
            invoke_endpoint(url, "alice.tar.gz", {"inputs": []})
        assert info.value.status == 400


@pytest.mark.integration
def test_loaded_model_answers_while_another_loads(make_loader, mme_source: Path) -> None:
    loader = make_loader(str(mme_source))
    loader.invoke("alice.tar.gz", scale_request([1]))
    loading = threading.Thread(target=loader.load, args=("bob.tar.gz",))
    loading.start()
    time.sleep(0.2)  # bob's load (~1.4 s: python stub start) is in flight
    started = time.perf_counter()
    assert output_of(loader.invoke("alice.tar.gz", scale_request([1]))) == [2.0]
    waited = time.perf_counter() - started
    still_loading = loading.is_alive()
    loading.join()
    assert still_loading, "bob loaded too fast for this test to mean anything"
    assert waited < 0.5
    assert loader.loaded() == ["alice.tar.gz", "bob.tar.gz"]


# tritonserver from 2.70 FullMatches a load's url against this (server repository, HEAD,
# src/sagemaker_server.h:86); the loader checks each url with its root in /opt/ml/models' place
UPSTREAM_LOAD_URL = r"(\/opt\/ml\/models\/[0-9A-Za-z._]+)\/(model)\/?([0-9A-Za-z._]+)?"


def test_load_urls_have_the_shape_the_sagemaker_front_end_accepts(tmp_path) -> None:
    from avatarforge.mme import MMEConfig, MMEError, MultiModelLoader
    from avatarforge.mme.loader import load_url_pattern
    from avatarforge.paths import build_dir

    pattern = load_url_pattern(Path("/opt/ml/models"))
    good = ["/opt/ml/models/0a1b/model", "/opt/ml/models/a.b_C/model/", "/opt/ml/models/x/model/y"]
    bad = ["/opt/ml/models/a-b/model", "/opt/ml/models/x/y/model", "/opt/ml/other/x/model"]
    bad += ["/opt/ml/models/x/model/a/b", "/opt/ml/models/x/modelz/y", "/opt/ml/models//model"]
    for url in good:
        assert re.fullmatch(UPSTREAM_LOAD_URL, url) and pattern.fullmatch(url), url
    for url in bad:
        assert not re.fullmatch(UPSTREAM_LOAD_URL, url) and not pattern.fullmatch(url), url
    # the default root, and one of the user's choosing: each url the loader would POST passes
    assert MMEConfig().models_root == ""  # build/mme/models
    for config in (MMEConfig(), MMEConfig(models_root=str(tmp_path / "my root-1"))):
        loader = MultiModelLoader("http://127.0.0.1:9", str(tmp_path), config=config)
        expected = Path(config.models_root or build_dir() / "mme" / "models")
        assert loader.root == expected.resolve()
        loader.check_load_url(loader.root / model_hash("team/alice.tar.gz") / "model")
        with pytest.raises(MMEError, match="does not match"):
            loader.check_load_url(loader.root / "a-b" / "model")


@pytest.mark.integration
def test_a_root_of_opt_ml_models_loads_as_on_sagemaker(sagemaker_server, mme_source, tmp_path):
    import fcntl
    import shutil
    import uuid

    from avatarforge.mme import MMEConfig, MultiModelLoader
    from avatarforge.serving.package_check import write_checksum

    root = Path("/opt/ml/models")
    created = next(p for p in (root, *root.parents) if p.exists()) != root
    target = f"opt-{uuid.uuid4().hex[:12]}.tar.gz"  # its own hash: runs cannot collide
    write_checksum(shutil.copy(mme_source / "alice.tar.gz", tmp_path / target))
    # one run at a time on this machine: a loader clears stale model folders under its root
    with open("/tmp/avatarforge-test-opt-ml-models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        loader = MultiModelLoader(sagemaker_server.sagemaker_url, str(tmp_path), None,
                                  MMEConfig(models_root=str(root)), check_model=None)  # fmt: skip
        try:
            assert output_of(loader.invoke(target, scale_request([1]))) == [2.0]
            url = loader.client.get(model_hash(target))["modelUrl"]
            assert url == f"/opt/ml/models/{model_hash(target)}/model"
            assert re.fullmatch(UPSTREAM_LOAD_URL, url)
        finally:
            loader.unload_all()
            if created:
                shutil.rmtree("/opt/ml", ignore_errors=True)
    assert not (root / model_hash(target)).exists()
