"""The training job against moto S3 in server mode (real HTTP): photos in, a servable
<user>.tar.gz in the MME prefix out, and every way a job can fail or be interrupted.

Each job runs the real path (preprocess with dlib/GrabCut, DreamBooth-LoRA on the tiny base,
package, upload) with tiny settings: a few seconds per job on 2 cores.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from fixtures.jobs import job_request, make_service_config, s3_keys, upload_photos

from avatarforge.adapter import METADATA_FILE, WEIGHTS_FILE, read_adapter
from avatarforge.hashing import sha256_file
from avatarforge.jobs import (
    JobError,
    JobEvent,
    JobTimeoutError,
    ServiceConfig,
    handle_invocation,
    parse_request,
    run_job,
)
from avatarforge.safe_tar import safe_extract
from avatarforge.testing.samples import write_hostile

pytestmark = pytest.mark.integration


def run(bucket: str, config: ServiceConfig, events: list | None = None, **request):
    parsed = parse_request(job_request(bucket, **request), config)
    return run_job(parsed, config, on_event=events.append if events is not None else None)


def kinds(events: list[JobEvent]) -> list[str]:
    return [e.kind for e in events]


def test_photos_in_s3_become_a_tarball_in_the_mme_prefix(
    s3_bucket, alice_photos, service_config, tiny_base, tmp_path
) -> None:
    ghost = service_config.work_path() / "ghost-job.k1ll3d"  # scratch of a killed job
    (ghost / "photos").mkdir(parents=True)
    body = handle_invocation(
        json.dumps(job_request(s3_bucket)).encode(), "application/json", service_config
    )
    result = json.loads(body)

    # the tarball, at the key the MME serves, laid out as SageMaker + Triton load it
    assert result["status"] == "succeeded"
    assert result["target_model"] == "alice.tar.gz"
    assert result["model_uri"] == f"s3://{s3_bucket}/af/models/alice.tar.gz"
    local = tmp_path / "alice.tar.gz"
    boto3.client("s3").download_file(s3_bucket, "af/models/alice.tar.gz", str(local))
    assert result["tarball_bytes"] == local.stat().st_size
    assert result["tarball_sha256"] == sha256_file(local)
    with tarfile.open(local) as tar:
        names = tar.getnames()
    assert {n.split("/")[0] for n in names} == {"alice"}  # one folder <user>/
    for member in ("config.pbtxt", "1/model.py", f"1/adapter/{WEIGHTS_FILE}"):
        assert f"alice/{member}" in names
    safe_extract(local, tmp_path / "x")
    adapter = tmp_path / "x" / "alice" / "1" / "adapter"
    meta = read_adapter(adapter)
    assert meta.base_hash == tiny_base.content_hash and meta.steps == 8
    assert (adapter / WEIGHTS_FILE).stat().st_size == result["adapter_bytes"]
    assert (adapter / METADATA_FILE).is_file()
    assert 'name: "alice"' in (tmp_path / "x" / "alice" / "config.pbtxt").read_text()

    # the result: what was kept, how long each stage took, on which base
    assert result["steps"] == 8 and result["resumed_from"] == 0
    assert sorted(result["photos"]["kept"]) == sorted(
        p.rsplit("/", 1)[-1] for p in s3_keys(s3_bucket, "af/photos/alice/")
    )
    assert result["photos"]["rejected"] == []
    assert set(result["seconds"]) == {"fetch", "preprocess", "train", "package", "upload", "total"}
    assert result["seconds"]["total"] >= sum(
        v for k, v in result["seconds"].items() if k != "total"
    )
    assert result["base"] == {"base_id": tiny_base.base_id, "content_hash": tiny_base.content_hash}

    # published in one PUT with its sha256 (S3's checksum): no .sha256 object after it (#22)
    head = boto3.client("s3").head_object(
        Bucket=s3_bucket, Key="af/models/alice.tar.gz", ChecksumMode="ENABLED"
    )
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == result["tarball_sha256"]
    assert head["Metadata"] == {"sha256": result["tarball_sha256"]}
    assert s3_keys(s3_bucket, "af/models/") == ["af/models/alice.tar.gz"]

    # stored beside the job; the checkpoint is gone; the claim given back; the photos untouched;
    # no local leftovers
    keys = s3_keys(s3_bucket)
    assert "af/jobs/job-1/result.json" in keys
    assert "af/jobs/job-1/checkpoint.tar.gz" not in keys
    claim = boto3.client("s3").get_object(Bucket=s3_bucket, Key="af/jobs/job-1/claim.json")
    claim = json.loads(claim["Body"].read())
    assert claim["holder"] == "" and claim["request"]["photos"].endswith("/af/photos/alice/")
    stored = boto3.client("s3").get_object(Bucket=s3_bucket, Key="af/jobs/job-1/result.json")
    assert json.loads(stored["Body"].read()) == result
    assert list(service_config.work_path().iterdir()) == []  # the ghost's too: nobody held it


def test_the_same_job_id_twice_trains_once(s3_bucket, alice_photos, service_config) -> None:
    # two submissions at once on one instance: one trains, the other waits for it
    events: list[JobEvent] = []
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: run(s3_bucket, service_config, events), range(2))
    assert first == second
    assert kinds(events).count("slot_acquired") == 1  # trained once
    assert kinds(events).count("reused") == 1
    assert "waiting_for_job" in kinds(events)
    # and later: the stored result, nothing trained, the tarball not rewritten
    etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key="af/models/alice.tar.gz")["ETag"]
    later: list[JobEvent] = []
    assert run(s3_bucket, service_config, later) == first
    assert kinds(later) == ["reused"]
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="af/models/alice.tar.gz")
    assert head["ETag"] == etag
    # the same job id for another user is refused, not silently mixed up
    with pytest.raises(JobError, match="already produced the model of user 'alice'") as info:
        run(s3_bucket, service_config, user="bob")
    assert info.value.status == 409 and info.value.client_fault


def test_one_job_id_is_one_request_and_runs_once_on_all_instances(
    s3_bucket, job_photos, service_config, tmp_path
) -> None:
    # Two instances, one job id and user, other photos (#22): both answered "succeeded" with
    # different tarballs. Now the second learns at once what the job id is.
    upload_photos(s3_bucket, "alice", job_photos)
    other = make_service_config(tmp_path / "instance-2")  # its own slots: another instance
    fewer = [f"s3://{s3_bucket}/af/photos/alice/{p.name}" for p in job_photos[:3]]
    claimed = threading.Event()

    def on_event(event: JobEvent) -> None:
        if event.kind == "slot_acquired":  # the claim is taken before the slot
            claimed.set()

    request = parse_request(job_request(s3_bucket), service_config)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_job, request, service_config, on_event=on_event)
        assert claimed.wait(120), running.exception(0) if running.done() else "no slot"
        started = time.monotonic()
        with pytest.raises(JobError, match=r"already names another request \(its photos diff"):
            run(s3_bucket, other, photos=fewer)
        with pytest.raises(JobError, match="is running on another training instance") as info:
            run(s3_bucket, other)  # the same request: it runs elsewhere, not twice
        assert info.value.status == 409 and time.monotonic() - started < 10  # told at once
        result = running.result()
    head = boto3.client("s3").head_object(
        Bucket=s3_bucket, Key="af/models/alice.tar.gz", ChecksumMode="ENABLED"
    )
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == result.tarball_sha256
    # afterwards: the other request is still refused (not given the first one's model); the
    # same request, on any instance, gets the result
    with pytest.raises(JobError, match="already names another request"):
        run(s3_bucket, other, photos=fewer)
    assert run(s3_bucket, other) == result


def test_no_usable_face_fails_with_the_reasons_and_writes_nothing(
    s3_bucket, service_config, job_photos, tmp_path
) -> None:
    hostile = tmp_path / "hostile"
    write_hostile(hostile)
    photos = [job_photos[0], hostile / "no_face.jpg", hostile / "small_face.jpg"]
    upload_photos(s3_bucket, "carol", photos)
    with pytest.raises(JobError) as info:
        run(s3_bucket, service_config, job_id="job-c", user="carol")
    error = info.value
    assert error.status == 400 and error.client_fault
    message = str(error)
    assert "only 1 usable photo(s), need at least 3 (preprocess.min_images)" in message
    assert "no_face.jpg: no face found" in message
    assert "small_face.jpg: face too small" in message
    assert error.details["kept"] == ["astronaut.jpg"]
    assert {r["source"] for r in error.details["rejected"]} == {"no_face.jpg", "small_face.jpg"}
    assert s3_keys(s3_bucket, "af/models/") == []
    # the claim given back; the progress and contact sheet show why (the HTTP API reads them)
    assert s3_keys(s3_bucket, "af/jobs/") == [
        f"af/jobs/job-c/{name}" for name in ("claim.json", "contact_sheet.png", "progress.json")
    ]
    assert list(service_config.work_path().iterdir()) == []
    # the user's photos are untouched
    assert s3_keys(s3_bucket, "af/photos/carol/") == [f"af/photos/carol/{p.name}" for p in photos]


@pytest.mark.smoke
def test_photo_limits_are_checked_on_the_listing_before_any_download(
    s3_bucket, tmp_path, job_photos
) -> None:
    s3 = boto3.client("s3")
    config = make_service_config(tmp_path, max_photo_bytes=100_000, max_total_photo_bytes=250_000)
    # thousands of objects under the prefix
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=s3_bucket, Key=f"af/photos/dan/{i}.jpg",
                                              Body=b"x"), range(1200)))  # fmt: skip
    with pytest.raises(JobError, match=r"at least 31 objects, more than the limit of 30") as info:
        run(s3_bucket, config, job_id="job-d", user="dan")
    assert info.value.status == 400 and "max_photos 30" in str(info.value)
    # one photo over the byte limit, named
    s3.put_object(Bucket=s3_bucket, Key="af/photos/eve/big.jpg", Body=b"x" * 150_000)
    s3.put_object(Bucket=s3_bucket, Key="af/photos/eve/ok.jpg", Body=b"x" * 10)
    with pytest.raises(JobError, match=r"af/photos/eve/big\.jpg: 0 MiB, more than 0 MiB") as info:
        run(s3_bucket, config, job_id="job-e", user="eve")
    assert info.value.client_fault
    # too many bytes in all
    for i in range(3):
        s3.put_object(Bucket=s3_bucket, Key=f"af/photos/fay/{i}.jpg", Body=b"x" * 90_000)
    with pytest.raises(JobError, match=r"0\.3 MiB in all, more than the limit of 0\.2 MiB"):
        run(s3_bucket, config, job_id="job-f", user="fay")
    # a listed URI that does not exist; an empty prefix
    with pytest.raises(JobError, match=r"photos: s3://.*/af/photos/eve/gone\.jpg: no such object"):
        run(s3_bucket, config, job_id="job-g", user="eve",
            photos=[f"s3://{s3_bucket}/af/photos/eve/ok.jpg",
                    f"s3://{s3_bucket}/af/photos/eve/gone.jpg"])  # fmt: skip
    with pytest.raises(JobError, match=r"photos: no objects under") as info:
        run(s3_bucket, config, job_id="job-h", user="nobody")
    assert info.value.status == 400
    assert not any(config.work_path().iterdir())  # nothing was downloaded, nothing left
    assert s3_keys(s3_bucket, "af/models/") == []


def test_at_most_two_jobs_train_at_once_and_a_third_waits(
    s3_bucket, service_config, job_photos
) -> None:
    users = ("ann", "ben", "cat")
    for user in users:
        upload_photos(s3_bucket, user, job_photos)
    events: list[JobEvent] = []
    lock = threading.Lock()

    def record(event: JobEvent) -> None:
        with lock:
            events.append(event)

    def one(user: str):
        request = parse_request(job_request(s3_bucket, job_id=f"job-{user}", user=user),
                                service_config)  # fmt: skip
        return run_job(request, service_config, on_event=record)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, users))
    assert [r.user for r in results] == list(users)  # all three finished
    published = [f"af/models/{u}.tar.gz" for u in users]
    assert s3_keys(s3_bucket, "af/models/") == published  # each package, its sha256 in it

    acquired = {e.job_id: e.at for e in events if e.kind == "slot_acquired"}
    released = {e.job_id: e.at for e in events if e.kind == "slot_released"}
    waiting = [e.job_id for e in events if e.kind == "waiting_for_slot"]
    assert len(acquired) == 3 and len(waiting) == 1  # exactly one job had to wait
    (late,) = waiting
    first_release = min(at for job, at in released.items() if job != late)
    assert acquired[late] >= first_release  # it got a slot only when one was given back
    # never more than two slots held at once (timestamps of the slot events, not sleeps)
    for job, at in acquired.items():
        holding = [j for j in acquired if acquired[j] <= at < released[j]]
        assert len(holding) <= 2, (job, holding)


def test_a_job_past_its_deadline_fails_clearly_and_a_resubmission_resumes(
    s3_bucket, alice_photos, service_config
) -> None:
    # Time, as the job sees it, jumps past the deadline once its first checkpoint is in S3.
    offset = [0.0]

    def clock() -> float:
        return time.monotonic() + offset[0]

    def on_event(event: JobEvent) -> None:
        if event.kind == "checkpoint":
            offset[0] = 10 * service_config.deadline_s

    request = parse_request(job_request(s3_bucket), service_config)
    with pytest.raises(JobTimeoutError) as info:
        run_job(request, service_config, clock=clock, on_event=on_event)
    error = info.value
    assert error.status == 504 and not error.client_fault
    assert error.step == 3 and error.total == 8  # checkpoint at 2, then stopped after step 3
    assert "stopped at its deadline" in str(error) and "after step 3 of 8" in str(error)
    assert f"saved step 3 of 8 to {request.checkpoint_uri}" in str(error)
    assert "re-submit the same job id to resume from step 3" in str(error)
    keys = s3_keys(s3_bucket)
    assert "af/jobs/job-1/checkpoint.tar.gz" in keys
    assert "af/models/alice.tar.gz" not in keys and "af/jobs/job-1/result.json" not in keys
    assert list(service_config.work_path().iterdir()) == []

    events: list[JobEvent] = []
    result = run_job(request, service_config, on_event=events.append)
    assert result.resumed_from == 3 and result.steps == 8
    assert [e.data for e in events if e.kind == "resumed"] == [{"step": 3}]
    keys = s3_keys(s3_bucket)
    assert "af/models/alice.tar.gz" in keys and "af/jobs/job-1/checkpoint.tar.gz" not in keys


def test_a_job_killed_half_way_leaves_no_tarball_and_resumes(
    s3_bucket, alice_photos, service_config, tmp_path
) -> None:
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(job_request(s3_bucket, train={"steps": 16})))
    env = {**os.environ, **service_config.to_env()}
    cli = Path(sys.executable).parent / "avatarforge"
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(cli), "job", "run", str(request_file)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while "af/jobs/job-1/checkpoint.tar.gz" not in s3_keys(s3_bucket, "af/jobs/"):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    keys = s3_keys(s3_bucket)
    assert "af/models/alice.tar.gz" not in keys and "af/jobs/job-1/result.json" not in keys
    leftovers = list(service_config.work_path().iterdir())
    assert len(leftovers) == 1  # the killed run's scratch folder: removed by the next run

    result = run(s3_bucket, service_config, train={"steps": 16})
    assert 0 < result.resumed_from < 16 and result.steps == 16
    assert list(service_config.work_path().iterdir()) == []
    keys = s3_keys(s3_bucket)
    assert "af/models/alice.tar.gz" in keys and "af/jobs/job-1/checkpoint.tar.gz" not in keys
