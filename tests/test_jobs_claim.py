"""A job id's claim in moto S3 (real HTTP, S3's conditional writes): one request per job id,
one run at a time on all instances; killed and expired runs do not block for ever."""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pytest
from fixtures.jobs import job_request, make_service_config

from avatarforge.jobs import JobError, parse_request
from avatarforge.jobs.claim import claim_uri, claimed, instance_id, read_claim
from avatarforge.storage import PreconditionFailedError, read_bytes, write_bytes

pytestmark = pytest.mark.integration


@pytest.fixture
def request_(s3_bucket: str, tmp_path: Path):
    return parse_request(job_request(s3_bucket), make_service_config(tmp_path))


def stored(request) -> dict:
    return json.loads(read_bytes(claim_uri(request))[0])


def take(request, instance: str) -> dict:
    """Claim, and give back: the claim as it was while held."""
    with claimed(request, instance, 600):
        return stored(request)


def test_conditional_writes_are_what_s3_and_moto_do(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/x"
    etag = write_bytes(uri, b"1", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        write_bytes(uri, b"2", if_none_match=True)  # it exists: not created again
    assert write_bytes(uri, b"3", if_match=etag) != etag
    with pytest.raises(PreconditionFailedError):
        write_bytes(uri, b"4", if_match=etag)  # changed since that ETag
    assert read_bytes(uri)[0] == b"3"


def test_a_claim_is_held_for_the_block_and_given_back(request_) -> None:
    with claimed(request_, "inst-a", 600):
        claim = stored(request_)
        assert claim["holder"].startswith("inst-a/") and claim["until"] > time.time() + 500
        assert claim["request"] == request_.to_dict()
        with pytest.raises(JobError, match="running on another training instance") as info:
            take(request_, "inst-b")
        assert info.value.status == 409
    assert stored(request_)["holder"] == ""  # given back: any instance may run it again
    with claimed(request_, "inst-b", 600):
        assert stored(request_)["holder"].startswith("inst-b/")


def test_another_request_under_the_job_id_is_refused_for_ever(request_, s3_bucket, tmp_path):
    take(request_, "inst-a")
    other = parse_request(job_request(s3_bucket, train={"steps": 5}), make_service_config(tmp_path))
    with pytest.raises(JobError, match=r"already names another request \(its train differ"):
        take(other, "inst-a")
    assert read_claim(other)["request"] == request_.to_dict()


def test_a_killed_runs_claim_is_taken_over_on_its_instance_or_once_expired(request_) -> None:
    # a run killed while it held the claim: it never gave it back
    write_bytes(claim_uri(request_), json.dumps({
        "request": request_.to_dict(), "holder": "inst-a/dead", "until": time.time() + 600,
    }).encode())  # fmt: skip
    with pytest.raises(JobError, match="running on another training instance"):
        take(request_, "inst-b")
    take(request_, "inst-a")  # its own instance (we hold the job's lock there)
    write_bytes(claim_uri(request_), json.dumps({
        "request": request_.to_dict(), "holder": "inst-a/dead", "until": time.time() - 1,
    }).encode())  # fmt: skip
    with claimed(request_, "inst-b", 600):  # expired: any instance
        assert stored(request_)["holder"].startswith("inst-b/")


def test_an_unreadable_claim_is_our_failure_not_a_run(request_, s3_bucket) -> None:
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=claim_uri(request_).split("/", 3)[3],
                                  Body=b"[" * 5000)  # fmt: skip
    with pytest.raises(JobError, match="claim .* is unreadable") as info:
        take(request_, "inst-a")
    assert info.value.status == 500


@pytest.mark.smoke
def test_instance_id_is_one_per_slots_folder(tmp_path: Path) -> None:
    first = instance_id(tmp_path / "slots")
    assert first == instance_id(tmp_path / "slots") and len(first) == 16
    assert instance_id(tmp_path / "other") != first
