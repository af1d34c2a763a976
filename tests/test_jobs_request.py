"""The job request schema and the service settings: what is accepted, what is refused and how
the refusal names the field. No S3 needed: every check here runs before anything is fetched."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fixtures.jobs import S3_PREFIX, SERVICE_TRAIN, make_service_config

from avatarforge.jobs import JobError, JobRequestError, JobResult, ServiceConfig, parse_request
from avatarforge.jobs.handler import check_content_type
from avatarforge.jobs.slots import SlotTimeout, job_lock, training_slot
from avatarforge.settings import ConfigError

GOOD = {
    "job_id": "job-1",
    "user": "alice",
    "photos": f"{S3_PREFIX}photos/alice/job-1",
    "models_prefix": f"{S3_PREFIX}models",
}


@pytest.fixture
def config(tmp_path: Path) -> ServiceConfig:
    return make_service_config(tmp_path)


def refused(data, config: ServiceConfig, match: str) -> JobRequestError:
    with pytest.raises(JobRequestError, match=match) as info:
        parse_request(data, config)
    assert info.value.client_fault and info.value.status == 400
    return info.value


def test_a_good_request_is_normalised(config: ServiceConfig) -> None:
    request = parse_request(json.dumps(GOOD).encode(), config)
    assert request.photos == "s3://avatarforge-test/af/photos/alice/job-1/"
    assert request.models_prefix == "s3://avatarforge-test/af/models/"
    # default work prefix: the deployment's 'jobs/', beside the models prefix
    assert request.work_prefix == "s3://avatarforge-test/af/jobs/"
    assert request.model_uri == "s3://avatarforge-test/af/models/alice.tar.gz"
    assert request.target_model == "alice.tar.gz"
    assert request.checkpoint_uri == "s3://avatarforge-test/af/jobs/job-1/checkpoint.tar.gz"
    assert request.result_uri == "s3://avatarforge-test/af/jobs/job-1/result.json"
    # the normalised form parses to the same request (str, bytes and dict alike)
    assert parse_request(request.to_dict(), config) == request
    assert parse_request(json.dumps(request.to_dict()), config) == request


def test_overrides_and_a_list_of_photos(config: ServiceConfig) -> None:
    mine = f"{S3_PREFIX}photos/alice/"
    data = GOOD | {
        "photos": [f"{mine}a/1.jpg", f"{mine}b/2.heic"],
        "work_prefix": f"{S3_PREFIX}jobs",
        "train": {"steps": 3000, "unet_rank": 64, "learning_rate": 5e-5, "seed": 7},
        "preprocess": {"min_images": 4, "backgrounds": 0},
    }
    request = parse_request(data, config)
    assert request.photos == (f"{mine}a/1.jpg", f"{mine}b/2.heic")
    assert request.work_prefix == f"{S3_PREFIX}jobs/"
    assert request.train == {"steps": 3000, "unet_rank": 64, "learning_rate": 5e-5, "seed": 7}
    assert request.preprocess == {"min_images": 4, "backgrounds": 0}


@pytest.mark.parametrize(
    ("user", "why"),
    [
        ("../x", "not a valid user id"),
        ("a/b", "not a valid user id"),
        ("", "not a valid user id"),
        ("alice.tar.gz", "not a valid user id"),
        ("model_setup", "not a valid user id"),
        ("sd_base_1234", "not a valid user id"),
        ("x" * 64, "not a valid user id"),
        (7, "not a valid user id"),
    ],
)
def test_path_escaping_and_reserved_user_ids_are_refused(user, why, config) -> None:
    error = refused(GOOD | {"user": user}, config, why)
    assert str(error).startswith("user:")


@pytest.mark.parametrize("job_id", ["../j", "j/1", "", "j 1", None])
def test_bad_job_ids_are_refused(job_id, config) -> None:
    refused(GOOD | {"job_id": job_id}, config, r"^job_id: .* is not a valid job id")


@pytest.mark.parametrize(
    ("photos", "match"),
    [
        ("https://example.com/a.jpg", r"^photos: expected an s3://"),
        ("file:///etc/passwd", r"^photos: expected an s3://"),
        ("/home/alice/selfies", r"^photos: expected an s3://"),
        ("s3://Bad_Bucket/p/", r"^photos: 'Bad_Bucket' is not a valid S3 bucket"),
        ("s3://uploads-bkt/", r"^photos: give a prefix inside the bucket"),
        ("s3://uploads-bkt/a/../b/", r"^photos: key has an empty, '\.' or '\.\.' segment"),
        (["s3://uploads-bkt/a.jpg", "http://x/b.jpg"], r"^photos\[1\]: expected an s3://"),
        (["s3://uploads-bkt/a/"], r"^photos\[0\]: names a prefix"),
        (["s3://uploads-bkt/a/x.jpg", "s3://uploads-bkt/b/x.jpg"], r"^photos\[1\]: same file"),
        ([], r"^photos: the list is empty"),
        ({"prefix": "s3://uploads-bkt/p/"}, r"^photos: expected an s3:// prefix or a list"),
    ],
)
def test_non_s3_and_hostile_photo_uris_are_refused(photos, match, config) -> None:
    refused(GOOD | {"photos": photos}, config, match)


def test_thousands_of_photo_uris_are_refused_before_any_s3_call(config) -> None:
    photos = [f"{S3_PREFIX}photos/alice/{i}.jpg" for i in range(5000)]
    refused(GOOD | {"photos": photos}, config, r"^photos: 5000 URIs, more than the limit of 30")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"models_prefix": "http://x/models/"}, r"^models_prefix: expected an s3://"),
        ({"models_prefix": "s3://models-bkt/a b/"}, r"^models_prefix: use letters, digits"),
        (
            {"work_prefix": f"{S3_PREFIX}models/jobs/"},
            r"^work_prefix: .* lies inside models_prefix",
        ),
        # the other way round: job_id 'models' would name the models prefix (#22)
        ({"work_prefix": S3_PREFIX}, r"^work_prefix: .* holds models_prefix"),
        ({"work_prefix": "s3://work-bkt/../x/"}, r"^work_prefix: key has an empty"),
        # only the deployment's prefixes (#22): no other bucket or prefix, no other user's photos
        ({"models_prefix": "s3://models-bkt/"}, r"^models_prefix: .* is not this deployment's"),
        ({"models_prefix": f"{S3_PREFIX}models/x"}, r"^models_prefix: .* is not this deploy"),
        ({"work_prefix": "s3://work-bkt/jobs/"}, r"^work_prefix: .* is not this deployment's"),
        ({"photos": "s3://uploads-bkt/photos/alice/"}, r"^photos: .* is not under 's3://avatar"),
        ({"photos": f"{S3_PREFIX}photos/bob/"}, r"^photos: .*photos/bob/' is not under .*/alice/"),
        ({"photos": f"{S3_PREFIX}photos/"}, r"^photos: .* is not under"),
        ({"photos": f"{S3_PREFIX}photos/alicea/"}, r"^photos: .* is not under"),
        ({"photos": f"{S3_PREFIX}jobs/alice/"}, r"^photos: .* is not under"),
        (
            {"photos": [f"{S3_PREFIX}photos/alice/a.jpg", f"{S3_PREFIX}photos/bob/b.jpg"]},
            r"^photos\[1\]: .* is not under",
        ),
    ],
)
def test_bad_prefixes_are_refused(extra, match, config) -> None:
    refused(GOOD | extra, config, match)


def test_a_service_without_its_deployments_prefix_refuses_every_job(tmp_path) -> None:
    config = make_service_config(tmp_path, s3_prefix="")
    with pytest.raises(JobError, match="misconfigured: service.s3_prefix: not set") as info:
        parse_request(GOOD, config)
    assert info.value.status == 500 and not info.value.client_fault  # ours to fix
    with pytest.raises(ConfigError, match="service.s3_prefix: s3://<bucket>/<prefix>/"):
        make_service_config(tmp_path, s3_prefix="s3://b/no-slash")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"steps": 10**9}, r"^train\.steps: must be <= 3000 \(got 1000000000\)"),
        ({"steps": 0}, r"^train\.steps: must be >= 1"),
        ({"resolution": 4096}, r"^train\.resolution: must be <= 768"),
        ({"resolution": 100}, r"^train\.resolution: must be a multiple of 8"),
        ({"unet_rank": 1024}, r"^train\.unet_rank: must be <= 64"),
        ({"num_class_images": 100000}, r"^train\.num_class_images: must be <= 200"),
        ({"learning_rate": 1.0}, r"^train\.learning_rate: must be <= 0\.01"),
        ({"steps": "100"}, r"^train\.steps: expected a finite number"),
        ({"steps": True}, r"^train\.steps: expected a finite number"),
        ({"steps": 10.5}, r"^train\.steps: expected an integer"),
        ({"learning_rate": float("nan")}, r"^train\.learning_rate: expected a finite number"),
        ({"train_text_encoder": 1}, r"^train\.train_text_encoder: expected true or false"),
        ({"token": "x" * 33}, r"^train\.token: at most 32 characters"),
        ({"instance_prompt": "a photo of person"}, r"^train\.instance_prompt: must contain"),
        ({"mixed_precision": "no"}, r"^train\.mixed_precision: not allowed in a request"),
        ({"device": "cuda:7"}, r"^train\.device: not allowed in a request"),
        ({"max_steps_this_run": 1}, r"^train\.max_steps_this_run: not allowed"),
        ({"base": "/etc"}, r"^train\.base: not allowed in a request"),
    ],
)
def test_huge_and_forbidden_training_overrides_are_refused(overrides, match, config) -> None:
    refused(GOOD | {"train": overrides}, config, match)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"min_images": 1000}, r"^preprocess\.min_images: must be <= 50"),
        ({"backgrounds": 16}, r"^preprocess\.backgrounds: must be <= 4"),
        ({"detector": "cnn"}, r"^preprocess\.detector: not allowed in a request"),
        ({"max_pixels": 10**10}, r"^preprocess\.max_pixels: not allowed"),
        ("min_images=3", r"^preprocess: expected a JSON object"),
    ],
)
def test_preprocess_overrides_are_bounded(overrides, match, config) -> None:
    refused(GOOD | {"preprocess": overrides}, config, match)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (GOOD | {"priority": "high"}, r"^unknown field\(s\) 'priority'"),
        ({k: v for k, v in GOOD.items() if k != "photos"}, r"^missing required field\(s\): photos"),
        (b"{not json", r"^request: not valid JSON"),
        (b"\xff\xfe", r"^request: not UTF-8"),
        (b"[1, 2]", r"^request: expected a JSON object, got list"),
        (b" " * (256 * 1024 + 1), r"^request: 262145 bytes, more than 262144"),
        (42, r"^request: expected JSON, got int"),
    ],
)
def test_malformed_requests_are_refused(data, match, config) -> None:
    refused(data, config, match)


def test_content_types() -> None:
    for ok in (None, "", "application/json", "application/json; charset=utf-8", "text/plain"):
        check_content_type(ok)
    check_content_type("application/octet-stream")  # InvokeEndpointAsync without a ContentType
    with pytest.raises(JobRequestError, match="content type 'image/jpeg'") as info:
        check_content_type("image/jpeg")
    assert info.value.status == 415 and info.value.client_fault


# ---------------------------------------------------------------- the service settings


def test_service_config_from_env_round_trip(tmp_path: Path) -> None:
    config = make_service_config(tmp_path, max_photos=12, deadline_s=600.0)
    again = ServiceConfig.from_env(config.to_env())
    assert again == config and again.train_defaults == SERVICE_TRAIN
    env = {
        "AVATARFORGE_SERVICE_MAX_CONCURRENT_JOBS": "3",
        "AVATARFORGE_SERVICE_TRAIN_DEFAULTS": '{"steps": 400}',
        "UNRELATED": "x",
    }
    config = ServiceConfig.from_env(env)
    assert config.max_concurrent_jobs == 3 and config.train_defaults == {"steps": 400}
    assert config.deadline_s == 3300.0 < 3600  # below the async InvocationTimeoutSeconds


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"AVATARFORGE_SERVICE_MAX_PHOTOS": "many"}, "AVATARFORGE_SERVICE_MAX_PHOTOS: expected an"),
        ({"AVATARFORGE_SERVICE_MAX_PHOTOS": "0"}, r"service\.max_photos: must be >= 1"),
        ({"AVATARFORGE_SERVICE_DEADLINE_S": "7200"}, r"service\.deadline_s: must be <= 3600"),
        (
            {
                "AVATARFORGE_SERVICE_DEADLINE_S": "100",
                "AVATARFORGE_SERVICE_FINISH_RESERVE_S": "100",
            },
            r"service\.finish_reserve_s: must be below deadline_s",
        ),
        ({"AVATARFORGE_SERVICE_TRAIN_DEFAULTS": "[1]"}, "TRAIN_DEFAULTS: expected a JSON object"),
        (
            {"AVATARFORGE_SERVICE_TRAIN_DEFAULTS": '{"stepz": 1}'},
            r"service\.train_defaults: train: unknown field\(s\) stepz",
        ),
        (
            {"AVATARFORGE_SERVICE_TRAIN_DEFAULTS": '{"resume": false}'},
            r"service\.train_defaults: resume are set by the job",
        ),
        (
            {"AVATARFORGE_SERVICE_PREPROCESS_DEFAULTS": '{"size": 1}'},
            r"service\.preprocess_defaults: preprocess\.size: must be >= 64",
        ),
    ],
)
def test_bad_service_settings_name_the_variable_or_field(env, match) -> None:
    with pytest.raises(ConfigError, match=match):
        ServiceConfig.from_env(env)


def test_result_round_trip_and_a_failure_is_not_a_result() -> None:
    data = {
        "job_id": "j",
        "user": "u",
        "status": "succeeded",
        "target_model": "u.tar.gz",
        "model_uri": "s3://b/m/u.tar.gz",
        "tarball_bytes": 1,
        "tarball_sha256": "0" * 64,
        "adapter_bytes": 1,
        "steps": 8,
        "resumed_from": 0,
        "seconds": {"fetch": 1.0, "total": 2.0},
        "photos": {"kept": ["a.jpg"], "rejected": []},
        "base": {"base_id": "b", "content_hash": "h"},
        "avatarforge_version": "0.1.0",
    }
    assert JobResult.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match="status 'failed'"):
        JobResult.from_dict(data | {"status": "failed"})
    with pytest.raises(ValueError, match="lacks model_uri"):
        JobResult.from_dict({k: v for k, v in data.items() if k != "model_uri"})


# ---------------------------------------------------------------- slots


def test_slots_admit_n_holders_and_time_out_the_next(tmp_path: Path) -> None:
    waited = []
    with training_slot(tmp_path, 2) as a, training_slot(tmp_path, 2) as b:
        assert {a.index, b.index} == {0, 1}
        started = time.monotonic()
        with (
            pytest.raises(SlotTimeout),
            training_slot(tmp_path, 2, timeout_s=0.5, on_wait=lambda: waited.append(1)),
        ):
            pass
        assert time.monotonic() - started >= 0.5 and waited == [1]
    with training_slot(tmp_path, 2, timeout_s=0.5) as c:  # released: free again
        assert c.waited_s < 0.5
    with (
        job_lock(tmp_path, "j1"),
        pytest.raises(SlotTimeout),
        job_lock(tmp_path, "j1", timeout_s=0.3),
    ):
        pass
