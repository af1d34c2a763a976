"""`avatarforge forget USER`: every place a user's data lands, locally, in running servers and in
a deployment's bucket (moto in server mode), removed for one user and never for another whose
id shares its beginning (``al`` and ``alice``); run twice, the second run finds nothing.

And the training service's retention: a job leaves none of the user's photos or working images
on the instance's disk, whether it succeeds, fails or is ended by SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from fixtures.jobs import job_request, s3_keys
from fixtures.mme import SCALE_MODEL_PY, scale_config, scale_request, write_scale_archive
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.forget import forget
from avatarforge.forget.local import places
from avatarforge.mme.loader import model_hash

runner = CliRunner()
USERS = ("al", "alice")


@pytest.fixture
def build(tmp_path, monkeypatch) -> Path:
    """A build folder of its own (never the shared test cache)."""
    root = tmp_path / "build"
    root.mkdir()
    monkeypatch.setenv("AVATARFORGE_BUILD", str(root))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root``: relative path -> sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def forget_cli(*args: str):
    return runner.invoke(app, ["forget", *args])


def report_of(result) -> dict:
    assert result.output.lstrip().startswith("{"), result.output
    return json.loads(result.output)


# ------------------------------------------------------------------------------ the build folder


def write_user_files(root: Path, user: str) -> None:
    """A file (or folder) of ``user`` in every place a command writes one by default."""
    files = {
        f"photos/{user}/selfie1.jpg": b"jpeg",
        f"datasets/{user}/images/0001.png": b"png",
        f"datasets/{user}/manifest.json": b"{}",
        f"users/{user}/adapter/pytorch_lora_weights.safetensors": b"w",
        f"users/{user}/checkpoints/step-2/state.json": b"{}",
        f"package/.{user}-ab12cd_e/{user}/1/adapter/w": b"interrupted packaging",
        f"export/kohya/.{user}.safetensors-zz99zz99": b"interrupted export",
        f"generate/{user}/00.jpg": b"jpeg",
        f"generate-local/{user}/00-seed1.jpg": b"jpeg",
        f"avatars/{user}/classic/index.html": b"<html>",
        f"eval/{user}/report.json": b"{}",
        f"eval/.{user}-q1w2e3r4/grid.png": b"png",
        f"triton/repository-8000/{user}/config.pbtxt": b"name",
        f"triton/repository-8000/.{user}.loading-4242/{user}/config.pbtxt": b"name",
        f"triton/repository-8001/.{user}.tar.gz.unpacked/{user}/config.pbtxt": b"name",
        f"mme/models/{model_hash(user + '.tar.gz')}/model/{user}/config.pbtxt": b"name",
        f"mme/models/.staging-{model_hash(user + '.tar.gz')}-0a1b2c3d/archive.tar.gz": b"gz",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_forget_removes_every_local_file_of_al_and_none_of_alice(
    build, trained_adapter, tiny_base
) -> None:
    files_of = {}
    for user in ("alice", "al"):
        before_user = set(snapshot(build))
        write_user_files(build, user)
        # the real commands write the package, its digest and the export where they write them
        done = runner.invoke(app, ["package", "--user", user, "--adapter", str(trained_adapter),
                                   "--base", str(tiny_base.path)])  # fmt: skip
        assert done.exit_code == 0, done.output
        done = runner.invoke(app, ["export", user, "--adapter", str(trained_adapter)])
        assert done.exit_code == 0, done.output
        files_of[user] = set(snapshot(build)) - before_user
    shared = build / "class-images" / "0123456789abcdef0123"
    shared.mkdir(parents=True)
    (shared / "info.json").write_text("{}")
    (shared / "00000.png").write_bytes(b"png")
    (build / "package" / "al-x.tar.gz").write_bytes(b"another user: al-x")  # not al's
    before = snapshot(build)
    al_files = files_of["al"]
    assert len(al_files) >= 19  # every place above, the package and its digest, the export

    dry = report_of(forget_cli("al", "--dry-run", "--json"))
    assert snapshot(build) == before  # a dry run changes nothing
    assert {r["action"] for r in dry["removals"]} == {"would delete"}

    result = forget_cli("al", "--json")
    assert result.exit_code == 0, result.output
    report = report_of(result)
    after = snapshot(build)
    assert set(after) == set(before) - al_files  # all of al's, nothing else
    assert all(after[p] == before[p] for p in after)  # alice's, al-x's, class images: unchanged
    removed = {r["target"] for r in report["removals"]}
    assert removed == {r["target"] for r in dry["removals"]}  # the dry run listed exactly these
    what = {r["what"] for r in report["removals"]}
    for kind in ("photos", "dataset", "training output", "package", "package digest", "export",
                 "generated images", "avatars", "eval report", "triton repository",
                 "MME model files"):  # fmt: skip
        assert kind in what, (kind, what)
    assert all(r["action"] == "deleted" and r["where"] == "build" for r in report["removals"])
    assert any("class images" in n for n in report["notes"])  # kept, and why
    assert report["complete"]

    again = forget_cli("al")
    assert again.exit_code == 0, again.output
    assert "nothing of al found" in again.output
    assert snapshot(build) == after


@pytest.mark.parametrize(
    "user", ["../x", "al/", "", "al.tar.gz", "al*", "model_setup", "sd_base_1", "x" * 64]
)
def test_an_invalid_user_id_is_refused_before_anything_is_touched(build, user) -> None:
    write_user_files(build, "al")
    before = snapshot(build)
    result = forget_cli(user, "--config", str(build / "no-such-deploy.json"))
    assert result.exit_code == 1, result.output
    assert "is not a valid user id" in result.output
    assert snapshot(build) == before


def test_ids_differing_in_case_are_other_users(build) -> None:
    # The name rule allows capitals (Triton names and S3 keys are case-sensitive): `Al` is a
    # user of its own. Matching entries by their exact name also keeps a case-insensitive
    # file system, where users/Al would find users/al, from deleting al's files.
    for user in USERS:
        write_user_files(build, user)
    before = snapshot(build)
    result = forget_cli("Al", "--json")
    assert result.exit_code == 0, result.output
    assert report_of(result)["removals"] == []
    assert snapshot(build) == before


def test_places_are_exact_names_never_prefixes(tmp_path) -> None:
    import re

    for what, folder, pattern in places("al", tmp_path):
        for other in ("alice", "al-x", "al_", "Al", "alx.tar.gz", ".alice-abcdefgh"):
            assert not re.fullmatch(pattern, other), (what, folder, pattern, other)


# ------------------------------------------------------------------------------ running servers


@pytest.mark.integration
def test_forget_unloads_al_from_a_running_local_triton_and_keeps_alice(build) -> None:
    from avatarforge.netutil import free_port
    from avatarforge.tritonserver.launch import tritonserver

    port = free_port()
    repo = build / "triton" / f"repository-{port}"  # where local-triton keeps it
    for user, factor in (("al", 2.0), ("alice", 3.0)):
        (repo / user / "1").mkdir(parents=True)
        (repo / user / "config.pbtxt").write_text(scale_config(factor))
        (repo / user / "1" / "model.py").write_text(SCALE_MODEL_PY)
    with tritonserver([repo], load=list(USERS), http_port=port) as server:
        client = server.client()
        dry = report_of(forget_cli("al", "--dry-run", "--json"))
        assert client.is_model_ready("al")  # a dry run unloads nothing
        assert any(r["action"] == "would unload" for r in dry["removals"])

        result = forget_cli("al", "--json")
        assert result.exit_code == 0, result.output
        rows = [r for r in report_of(result)["removals"] if r["where"] == "local-triton"]
        target = f"http://127.0.0.1:{port} model al"
        assert [(r["what"], r["target"], r["action"], r["detail"]) for r in rows] == [
            ("loaded model", target, "unloaded", "was READY")
        ]
        assert not client.is_model_ready("al")
        assert not (repo / "al").exists() and (repo / "alice").is_dir()
        out = client.infer("alice", [_input([1.5])]).as_numpy("OUTPUT")
        assert out.tolist() == [4.5]  # alice still answers, with her own model
        assert report_of(forget_cli("al", "--json"))["removals"] == []  # nothing left


def _input(values):
    import numpy as np
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("INPUT", [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.float32))
    return tensor


@pytest.mark.integration
def test_forget_unloads_al_from_a_running_local_mme_and_keeps_alice(
    build, sagemaker_server
) -> None:
    from avatarforge.mme import MMEConfig, MultiModelLoader, UnknownTargetModelError
    from avatarforge.mme.front import mme_front

    source = build / "package"  # what `mme serve` serves by default
    for user, factor in (("al", 2.0), ("alice", 3.0)):
        write_scale_archive(source, user, factor)
    loader = MultiModelLoader(sagemaker_server.sagemaker_url, str(source),
                              build / "mme" / "models", MMEConfig(), check_model=None)  # fmt: skip
    try:
        for user in USERS:
            loader.invoke(f"{user}.tar.gz", scale_request([1.0]))
        al_files = build / "mme" / "models" / model_hash("al.tar.gz")
        assert al_files.is_dir()

        with mme_front(loader) as front:  # the MME front has no unload: named as such
            wrong = forget_cli("al", "--no-local", "--mme-sagemaker-url", front, "--json")
        assert wrong.exit_code == 1
        wrong = report_of(wrong)
        assert wrong["complete"] is False
        assert "the MME front is not tritonserver's SageMaker front end" in str(wrong)

        url = sagemaker_server.sagemaker_url
        result = forget_cli("al", "--mme-sagemaker-url", url, "--json")
        assert result.exit_code == 0, result.output
        report = report_of(result)
        assert {(r["where"], r["what"], r["action"]) for r in report["removals"]} >= {
            ("local MME", "loaded model", "unloaded"),
            ("build", "package", "deleted"),
            ("build", "MME model files", "deleted"),
        }
        assert not al_files.exists()
        # al is gone from Triton, the package with it: the loader's next load of al fails
        with pytest.raises(UnknownTargetModelError):
            loader.invoke("al.tar.gz", scale_request([1.0]))
        answer = loader.invoke("alice.tar.gz", scale_request([2.0]))
        assert answer["outputs"][0]["data"] == [6.0]
        assert loader.loaded() == ["alice.tar.gz"]
        again = report_of(forget_cli("al", "--mme-sagemaker-url", url, "--json"))
        assert again["removals"] == [] and again["complete"]
    finally:
        loader.unload_all()


# ------------------------------------------------------------------------------ a deployment


def put(s3, bucket: str, key: str, data) -> None:
    body = json.dumps(data).encode() if isinstance(data, dict) else data
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def all_versions(s3, bucket: str) -> set[tuple[str, str, bool]]:
    """(key, version id, delete marker?) of everything in the bucket."""
    found = set()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        found |= {(v["Key"], v["VersionId"], False) for v in page.get("Versions", [])}
        found |= {(m["Key"], m["VersionId"], True) for m in page.get("DeleteMarkers", [])}
    return found


def write_deployment(s3, bucket: str, user: str, *, now: float) -> None:
    """The objects a deployment holds for ``user`` (af/ is the deployment's prefix)."""
    job = f"{user}-20261207-120000-ab12"
    put(s3, bucket, f"af/photos/{user}/{job}/selfie1.jpg", b"jpeg")
    put(s3, bucket, f"af/photos/{user}/{job}/selfie2.jpg", b"jpeg")
    put(s3, bucket, f"af/models/{user}.tar.gz", b"tarball")
    put(s3, bucket, f"af/models/{user}.tar.gz.sha256", b"digest")
    out, failed = f"af/async/out/{user}-uuid.out", f"af/async/failed/{user}-uuid-error.out"
    request = {"job_id": job, "user": user, "photos": f"s3://{bucket}/af/photos/{user}/{job}/"}
    put(s3, bucket, f"af/jobs/{job}/request.json", request)
    put(s3, bucket, f"af/jobs/{job}/submission.json", {
        "job_id": job, "user": user, "photos": request["photos"],
        "output_location": f"s3://{bucket}/{out}", "failure_location": f"s3://{bucket}/{failed}",
    })  # fmt: skip
    put(s3, bucket, f"af/jobs/{job}/checkpoint.tar.gz", b"checkpoint")
    put(s3, bucket, f"af/jobs/{job}/result.json", {"job_id": job, "user": user})
    put(s3, bucket, out, {"job_id": job, "user": user})
    # a job run without the client (its claim names it) that read photos kept elsewhere
    direct = f"direct-{user}"
    put(s3, bucket, f"af/jobs/{direct}/claim.json", {
        "request": {"job_id": direct, "user": user, "photos": f"s3://elsewhere/{user}/"},
        "holder": "", "until": now - 10,
    })  # fmt: skip
    put(s3, bucket, f"af/jobs/{direct}/checkpoint.tar.gz", b"checkpoint")


@pytest.mark.integration
@pytest.mark.parametrize("versioned", [False, True], ids=["plain", "versioned"])
def test_forget_removes_al_from_a_deployment_and_none_of_alice(
    s3_bucket, tmp_path, versioned
) -> None:
    s3 = boto3.client("s3")
    if versioned:
        s3.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    now = time.time()
    for user in USERS:
        write_deployment(s3, s3_bucket, user, now=now)
    put(s3, s3_bucket, "af/jobs/orphan/checkpoint.tar.gz", b"no record names a user")
    put(s3, s3_bucket, "af/shared/base.tar.gz", b"shared")
    put(s3, s3_bucket, "af/photos/al", b"a key that only begins like al's prefix")
    if versioned:  # an older version, and a delete marker over another one: still al's data
        put(s3, s3_bucket, "af/photos/al/al-20261207-120000-ab12/selfie1.jpg", b"jpeg, again")
        put(s3, s3_bucket, "af/photos/al/old.jpg", b"old")
        s3.delete_object(Bucket=s3_bucket, Key="af/photos/al/old.jpg")
    config = tmp_path / "deploy.json"
    config.write_text(json.dumps({"bucket": s3_bucket, "prefix": "af/", "region": "us-east-1"}))

    al_keys = {"af/models/al.tar.gz", "af/models/al.tar.gz.sha256", "af/async/out/al-uuid.out"}
    al_folders = ("af/photos/al/", "af/jobs/al-20261207-120000-ab12/", "af/jobs/direct-al/")
    before = all_versions(s3, s3_bucket)
    mine = {v for v in before if v[0] in al_keys or v[0].startswith(al_folders)}
    assert len({key for key, _, _ in mine}) == 11 + versioned

    dry = forget_cli("al", "--no-local", "--config", str(config), "--dry-run", "--json")
    assert all_versions(s3, s3_bucket) == before
    result = forget_cli("al", "--no-local", "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    report = report_of(result)
    assert all_versions(s3, s3_bucket) == before - mine  # every version of al's, nothing else
    assert {r["target"] for r in report["removals"]} == {
        r["target"] for r in report_of(dry)["removals"]
    }
    rows = {(r["what"], r["target"].split("/af/", 1)[1]) for r in report["removals"]}
    assert rows == {
        ("photos", "photos/al/"),
        ("package", "models/al.tar.gz"),
        ("package digest", "models/al.tar.gz.sha256"),
        ("job records", "jobs/al-20261207-120000-ab12/"),
        ("job records", "jobs/direct-al/"),
        ("async output", "async/out/al-uuid.out"),  # (no failure document: it succeeded)
    }
    notes = " ".join(report["notes"])
    assert "s3://elsewhere/al/" in notes and "not deleted" in notes  # photos kept elsewhere
    assert "1 job folder(s)" in notes  # the orphan: left alone, said
    assert "no API to unload one TargetModel" in notes
    if versioned:
        photos = next(r for r in report["removals"] if r["what"] == "photos")
        assert "1 delete marker(s)" in photos["detail"]

    again = report_of(forget_cli("al", "--no-local", "--config", str(config), "--json"))
    assert again["removals"] == [] and again["complete"]
    assert all_versions(s3, s3_bucket) == before - mine


@pytest.mark.integration
def test_a_running_job_of_the_user_is_named_and_forget_must_run_again(s3_bucket) -> None:
    from avatarforge.deploy.config import DeployConfig

    s3 = boto3.client("s3")
    put(s3, s3_bucket, "af/jobs/j-run/claim.json", {
        "request": {"job_id": "j-run", "user": "al"}, "holder": "i-1/r-1",
        "until": time.time() + 3600,
    })  # fmt: skip
    deployment = DeployConfig(bucket=s3_bucket, prefix="af/")
    running = forget("al", local=False, deployment=deployment)
    assert not running.complete
    assert running.pending and "job j-run is running" in running.pending[0]
    assert "run forget again" in running.pending[0]
    assert s3_keys(s3_bucket) == []  # its records are deleted all the same


# ------------------------------------------------------------------------------ the service's disk


def image_files(*roots: Path) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".heic"}
    return [p for root in roots for p in root.rglob("*") if p.suffix.lower() in suffixes]


@pytest.mark.integration
def test_a_job_ended_by_sigterm_removes_the_users_photos_from_the_disk(
    s3_bucket, alice_photos, service_config, tmp_path
) -> None:
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(job_request(s3_bucket, train={"steps": 16})))
    scratch_tmp = tmp_path / "tmpdir"
    scratch_tmp.mkdir()
    env = {**os.environ, **service_config.to_env(), "TMPDIR": str(scratch_tmp)}
    cli = Path(sys.executable).parent / "avatarforge"
    log = tmp_path / "job.log"
    work = service_config.work_path()
    with open(log, "wb") as out:
        process = subprocess.Popen([str(cli), "job", "run", str(request_file)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while "af/jobs/job-1/checkpoint.tar.gz" not in s3_keys(s3_bucket, "af/jobs/"):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.05)
            # training: the photos and the dataset's images are on the disk now
            assert len(list(work.glob("*/photos/*.jpg"))) == 3, log.read_text()
            assert list(work.glob("*/dataset/**/*.png"))
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGTERM, log.read_text()  # it still ends as asked
    assert list(work.iterdir()) == [], log.read_text()
    assert image_files(work.parent, scratch_tmp) == []
    assert "ended by SIGTERM; its local files are removed" in log.read_text()
    # the checkpoint stays in S3: the same job id resumes (as after any stop)
    assert "af/jobs/job-1/checkpoint.tar.gz" in s3_keys(s3_bucket)
