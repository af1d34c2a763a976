"""The HTTP API (``avatarforge.api``) in process: FastAPI's ASGI test client against the real
app object, the real moto server for S3/SNS/SQS, and the local SageMaker runtime with an async
runner for the training endpoint.

The training endpoint's handler is a stand-in for the training service (a real training is the
slow browser test's, tests/test_api_browser.py): it answers as the service does (a result, or a
JobError), and writes the job's progress with the service's own :class:`ProgressReport`.
Webhooks go to a real HTTP server on loopback (allowed by ``webhook_allow_private``).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import threading
import time
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient
from fixtures.cloud import result_for
from PIL import Image

from avatarforge.api import ApiConfig, ApiService, create_app, hash_key, new_key, verify
from avatarforge.api.auth import RateLimiter
from avatarforge.api.service import ApiError
from avatarforge.api.tenancy import internal_user, new_training_id, owns
from avatarforge.api.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    SignatureError,
    WebhookUrlError,
    check_url,
    sign,
)
from avatarforge.jobs.errors import JobError
from avatarforge.jobs.progress import ProgressReport
from avatarforge.jobs.request import JobRequest
from avatarforge.names import InvalidNameError, check_user_id
from avatarforge.storage import list_prefix
from avatarforge.train.loop import StepInfo

pytestmark = pytest.mark.integration

KEY_A, KEY_B = new_key(), new_key()
SECRET = "s" * 40


def _jpeg(size=(320, 400), colour=(200, 120, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def api_config(**changes) -> ApiConfig:
    keys = [
        {"name": "app-a", "sha256": hash_key(KEY_A), "namespace": "appa"},
        {"name": "app-b", "sha256": hash_key(KEY_B), "namespace": "appb"},
    ]
    values = {
        "keys": keys,
        "webhook_allow_private": True,
        "webhook_backoff_s": 0.05,
        "webhook_attempts": 3,
        "predict_wait_s": 0.5,
        "presets": {"default": {}, "quick": {"steps": 60}},
        **changes,
    }
    return ApiConfig.from_dict(values)


class Trainer:
    """Stands in for the training service behind the async endpoint: progress through the
    service's ProgressReport, then its result, or its JobError."""

    def __init__(self) -> None:
        self.fail: JobError | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[dict] = []

    def __call__(self, body: bytes, content_type: str | None) -> bytes:
        request = json.loads(body)
        self.requests.append(request)
        job = JobRequest(
            request["job_id"], request["user"], request["photos"], request["models_prefix"],
            request["work_prefix"],
        )  # fmt: skip
        progress = ProgressReport(job, min_interval_s=0)
        progress.stage("fetch")
        progress.stage("train")
        progress.step(StepInfo(3, 8, 0.1, 0.5))
        self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        return json.dumps(result_for(request)).encode()


@pytest.fixture
def trainer() -> Trainer:
    return Trainer()


@pytest.fixture
def service(cloud_config, start_runtime, trainer, monkeypatch) -> ApiService:
    monkeypatch.setenv("AVATARFORGE_API_WEBHOOK_SECRET", SECRET)
    start_runtime(trainer)
    return ApiService(cloud_config, api_config())


@pytest.fixture
def client(service) -> TestClient:
    return TestClient(create_app(service, watch=False))


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(client: TestClient, user: str, files: list[tuple[str, bytes]], key: str = KEY_A):
    return client.post(
        f"/v1/users/{user}/photos",
        files=[("photos", (name, data, "image/jpeg")) for name, data in files],
        headers=auth(key),
    )


def wait_for(client, training_id, state, key=KEY_A, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/trainings/{training_id}", headers=auth(key)).json()
        if view.get("state") == state or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


class Receiver:
    """A webhook receiver on loopback: records each delivery, answers ``codes`` in turn."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = list(codes)
        self.got: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((dict(self.headers), body))
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/avatarforge?x=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(codes=()):
        made.append(Receiver(list(codes)))
        return made[-1]

    yield make
    for r in made:
        r.close()


# ------------------------------------------------------------------------------ auth


def test_every_v1_route_needs_a_known_key(client) -> None:
    routes = [
        ("post", "/v1/trainings", {"json": {"user": "alice"}}),
        ("get", "/v1/trainings/appa-t00", {}),
        ("post", "/v1/predictions", {"json": {"user": "alice", "prompt": "x"}}),
        ("delete", "/v1/users/alice", {}),
        ("get", "/v1/users/alice/photos", {}),
        ("post", "/v1/users/alice/photos", {"files": [("photos", ("a.jpg", _jpeg()))]}),
        ("get", "/v1/packs", {}),
    ]
    for method, path, kwargs in routes:
        for headers in ({}, {"Authorization": "Bearer afk_not-a-key"}, {"Authorization": KEY_A}):
            answer = getattr(client, method)(path, headers=headers, **kwargs)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.json()["client_fault"] is True
            assert answer.headers["WWW-Authenticate"] == "Bearer"
    # what anonymous callers reach: the page, its files, the OpenAPI document
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../config.py").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/v1/trainings", "/v1/predictions", "/v1/users/{user}"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 404  # it would load scripts from a CDN


@pytest.mark.smoke
def test_keys_are_kept_hashed_and_refused_when_malformed() -> None:
    key = new_key()
    assert key.startswith("afk_") and len(key) == 47
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    with pytest.raises(ValueError, match=r"keys\[0\]\.sha256"):
        ApiConfig.from_dict({"keys": [{"name": "a", "sha256": key}]})
    with pytest.raises(ValueError, match="namespace"):
        ApiConfig.from_dict({"keys": [{"name": "a", "sha256": "0" * 64, "namespace": "a-b"}]})
    with pytest.raises(ValueError, match="second key"):
        ApiConfig.from_dict({"keys": [{"name": "a", "sha256": "0" * 64}] * 2})
    with pytest.raises(ValueError, match=r"presets\.fast: device"):
        ApiConfig.from_dict({"presets": {"fast": {"device": "cpu"}}})


def test_the_rate_limit_is_per_key_with_retry_after(service) -> None:
    service.config.rate_per_minute, service.config.burst = 60, 3
    client = TestClient(create_app(service, watch=False))
    codes = [client.get("/v1/packs", headers=auth()).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    refused = client.get("/v1/packs", headers=auth())
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert client.get("/v1/packs", headers=auth(KEY_B)).status_code == 200  # its own bucket

    now = [0.0]
    limiter = RateLimiter(60, 2, clock=lambda: now[0])
    limiter.take("k")
    limiter.take("k")
    with pytest.raises(ApiError) as refused_once:
        limiter.take("k")
    assert refused_once.value.status == 429 and refused_once.value.retry_after == 1
    now[0] = 1.0  # a second later: one more
    limiter.take("k")


# ------------------------------------------------------------------------------ names


@pytest.mark.smoke
def test_a_namespace_keeps_every_user_id_apart_and_within_the_rule() -> None:
    assert internal_user("appa", "alice") == "appa-alice"
    longest = "a" * 63
    stored = internal_user("appa", longest)
    assert len(stored) == 63 and stored.startswith("appa-aaa") and check_user_id(stored)
    assert internal_user("appa", longest) != internal_user("appa", longest[:-1] + "b")
    assert internal_user("appa", "x" * 57) == "appa-" + "x" * 57  # 62: literal, never hashed
    # the first '-' ends the namespace: appa's "b-c" is not app's "a-b-c"
    assert internal_user("appa", "b-c") != internal_user("app", "ab-c")
    for bad in ("../x", "a/b", "alice\n", "", "model_setup", "sd_base_x", "a" * 64):
        with pytest.raises(InvalidNameError, match="user"):
            internal_user("appa", bad)
    assert owns("appa", new_training_id("appa")) and not owns("appb", new_training_id("appa"))
    assert new_training_id("appa", "k1") == new_training_id("appa", "k1")
    assert new_training_id("appa", "k1") != new_training_id("appb", "k1")


def test_user_ids_in_paths_follow_the_cli_rule(client) -> None:
    for bad in ("model_setup", "a.b", "sd_base_1", "x" * 64, "al%20ice"):
        answer = client.get(f"/v1/users/{bad}/photos", headers=auth())
        assert answer.status_code == 400, bad
        assert "not a valid user id" in answer.json()["error"]


# ------------------------------------------------------------------------------ photos


def test_photos_are_checked_like_preprocess_before_anything_is_stored(client, cloud_config):
    good = [(f"selfie {i}.jpg", _jpeg(colour=(10 * i, 100, 50))) for i in range(3)]
    bad = [
        ("empty.jpg", b""),
        ("notes.jpg", b"just text"),
        ("tiny.jpg", _jpeg(size=(60, 60))),
        ("cut.jpg", _jpeg()[:300]),
    ]
    answer = upload(client, "alice", good + bad)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert len(body["stored"]) == 3 and body["photos"] == 3
    reasons = {r["file"]: r["reason"] for r in body["rejected"]}
    assert "empty file" in reasons["empty.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "too small" in reasons["tiny.jpg"]
    assert "truncated" in reasons["cut.jpg"] or "corrupt" in reasons["cut.jpg"]
    stored = list_prefix(cloud_config.s3("photos", "appa-alice", "api") + "/")
    assert sorted(o.name for o in stored) == sorted(body["stored"])
    assert all(o.name.startswith("selfie-") for o in stored)  # the name made safe for a key
    # the same photos again: nothing new; none usable: 400 naming each, nothing stored
    assert upload(client, "alice", good).json()["photos"] == 3
    refused = upload(client, "bob", bad)
    assert refused.status_code == 400 and "notes.jpg: not an image" in refused.json()["error"]
    assert not list_prefix(cloud_config.s3("photos", "appa-bob") + "/")


def test_photo_limits_are_the_training_services(service, client, cloud_config) -> None:
    limits = service.photo_limits
    many = [(f"{i}.jpg", _jpeg(colour=(i, i, i))) for i in range(limits.max_photos + 1)]
    answer = upload(client, "alice", many)
    assert answer.status_code == 400 and f"limit of {limits.max_photos}" in answer.json()["error"]
    # over the service's limit counting the photos stored before: refused, nothing added
    service.photo_limits = type(limits)(max_photos=4)
    client = TestClient(create_app(service, watch=False))
    assert upload(client, "alice", many[:3]).status_code == 201
    answer = upload(client, "alice", many[3:5])
    assert answer.status_code == 400 and "more than the limit of 4" in answer.json()["error"]
    assert len(list_prefix(cloud_config.s3("photos", "appa-alice", "api") + "/")) == 3
    # a body past the whole upload's limit: 413 before it is parsed
    service.photo_limits = type(limits)(max_total_bytes=1000)
    client = TestClient(create_app(service, watch=False))
    answer = upload(client, "carol", [("a.jpg", b"x" * 2_000_000)])
    assert answer.status_code == 413


# ------------------------------------------------------------------------------ trainings


def _train(client, user="alice", key=KEY_A, **body):
    return client.post("/v1/trainings", json={"user": user, **body}, headers=auth(key))


def test_a_training_is_202_then_running_then_succeeded(client, trainer, cloud_config) -> None:
    upload(client, "alice", [("a.jpg", _jpeg())])
    trainer.gate.clear()
    answer = _train(client, preset="quick")
    assert answer.status_code == 202, answer.text
    view = answer.json()
    assert answer.headers["Location"] == f"/v1/trainings/{view['id']}"
    assert view["user"] == "alice" and view["state"] in ("queued", "running")
    running = wait_for(client, view["id"], "running")
    assert running["progress"]["stage"] == "train" and running["progress"]["step"] == 3
    assert 0.1 < running["progress"]["fraction"] < 1
    assert trainer.requests[0]["train"] == {"steps": 60}  # the preset, as overrides
    assert trainer.requests[0]["photos"] == cloud_config.s3("photos", "appa-alice", "api") + "/"
    trainer.gate.set()
    done = wait_for(client, view["id"], "succeeded")
    assert done["progress"]["fraction"] == 1.0 and done["failure"] is None
    assert done["photos"]["rejected"][0]["reason"] == "not an image"


def test_a_failed_training_says_why_and_whose_fault(client, trainer) -> None:
    upload(client, "alice", [("a.jpg", _jpeg())])
    trainer.fail = JobError(
        "photos: only 1 usable photo(s), need at least 5 (preprocess.min_images); rejected: "
        "b.jpg: no face found",
        status=400,
        details={"kept": ["a.jpg"], "rejected": [{"source": "b.jpg", "reason": "no face found"}]},
    )
    view = _train(client).json()
    failed = wait_for(client, view["id"], "failed")
    assert failed["failure"]["client_fault"] is True and failed["failure"]["code"] == 400
    assert "need at least 5" in failed["failure"]["reason"]
    assert failed["photos"]["rejected"] == [{"source": "b.jpg", "reason": "no face found"}]
    trainer.fail = JobError("job x: internal error (boom)")
    ours = wait_for(client, _train(client).json()["id"], "failed")
    assert ours["failure"]["client_fault"] is False and ours["failure"]["code"] == 500


def test_trainings_are_refused_before_anything_is_written(client, trainer, cloud_config):
    cases = [
        ({"user": "alice"}, 400, "has no photos"),  # nothing uploaded
        ({"user": "alice", "preset": "turbo"}, 400, "unknown preset 'turbo'"),
        ({"user": "../x"}, 400, "not a valid user id"),
        ({"user": "alice", "steps": 5}, 400, "steps"),  # unknown field, named
        ({"user": "alice", "webhook_url": "ftp://x/"}, 400, "http or https only"),
        ({}, 400, "user"),
    ]
    for body, code, phrase in cases:
        answer = client.post("/v1/trainings", json=body, headers=auth())
        assert answer.status_code == code, (body, answer.text)
        assert phrase in answer.json()["error"], (body, answer.json())
    answer = client.post("/v1/trainings", content=b"{", headers=auth())
    assert answer.status_code == 400
    assert not trainer.requests
    assert not list_prefix(cloud_config.jobs_prefix)


def test_an_idempotency_key_gives_one_training(client, trainer) -> None:
    upload(client, "alice", [("a.jpg", _jpeg())])
    first = _train(client, preset="quick", **{})
    key = {"Idempotency-Key": "order-17", **auth()}
    one = client.post("/v1/trainings", json={"user": "alice"}, headers=key)
    two = client.post("/v1/trainings", json={"user": "alice"}, headers=key)
    assert one.status_code == two.status_code == 202
    assert one.json()["id"] == two.json()["id"] != first.json()["id"]
    assert two.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in one.headers
    other = client.post("/v1/trainings", json={"user": "alice", "preset": "quick"}, headers=key)
    assert other.status_code == 409 and "another training request" in other.json()["error"]
    # another key's same Idempotency-Key is its own
    upload(client, "alice", [("a.jpg", _jpeg())], key=KEY_B)
    theirs = client.post(
        "/v1/trainings", json={"user": "alice"}, headers={**key, **auth(KEY_B)}
    ).json()
    assert theirs["id"] != one.json()["id"]
    wait_for(client, one.json()["id"], "succeeded")
    assert len(trainer.requests) == 3  # first, order-17 once, key B's


def test_one_keys_users_and_trainings_are_invisible_to_another(client, trainer) -> None:
    upload(client, "alice", [("a.jpg", _jpeg())])
    view = _train(client).json()
    assert view["id"].startswith("appa-")
    for path in (f"/v1/trainings/{view['id']}", f"/v1/trainings/{view['id']}/contact_sheet.png"):
        answer = client.get(path, headers=auth(KEY_B))
        assert answer.status_code == 404 and view["id"] in answer.json()["error"]
    assert client.get("/v1/users/alice/photos", headers=auth(KEY_B)).json()["photos"] == []
    theirs = client.post("/v1/trainings", json={"user": "alice"}, headers=auth(KEY_B))
    assert theirs.status_code == 400 and "has no photos" in theirs.json()["error"]
    forgotten = client.delete("/v1/users/alice", headers=auth(KEY_B)).json()
    assert forgotten["removals"] == []  # B's alice is not A's
    assert client.get(f"/v1/trainings/{view['id']}", headers=auth()).status_code == 200


# ------------------------------------------------------------------------------ webhooks


def test_webhooks_are_signed_retried_and_sent_once(service, client, receiver) -> None:
    hook = receiver(codes=[500, 200])
    upload(client, "alice", [("a.jpg", _jpeg())])
    view = _train(client, webhook_url=hook.url).json()
    assert view["webhook_url"] == hook.url
    wait_for(client, view["id"], "succeeded")
    outbox = service.outbox()
    outbox.run_once()  # HTTP 500: kept, tried again after the backoff
    assert len(hook.got) == 1
    time.sleep(0.1)
    assert outbox.run_once() == 1
    assert outbox.run_once() == 0  # delivered: nothing left
    assert len(hook.got) == 2
    (h1, b1), (h2, b2) = hook.got
    assert b1 == b2 and h1[ID_HEADER] == h2[ID_HEADER] == f"evt_{view['id']}_succeeded"
    event = json.loads(b2)
    assert event["type"] == "training.succeeded" and event["data"]["user"] == "alice"
    assert verify(SECRET.encode(), h2[SIGNATURE_HEADER], b2) > 0
    with pytest.raises(SignatureError, match="matches"):
        verify(b"another secret, 32 bytes or more!", h2[SIGNATURE_HEADER], b2)
    with pytest.raises(SignatureError, match="matches"):
        verify(SECRET.encode(), h2[SIGNATURE_HEADER], b2.replace(b"alice", b"mallory"))
    old = sign(SECRET.encode(), b2, int(time.time()) - 3600)
    with pytest.raises(SignatureError, match="replayed"):
        verify(SECRET.encode(), old, b2)


def test_a_webhook_that_keeps_failing_is_dropped_after_its_attempts(service, client, receiver):
    hook = receiver(codes=[503] * 10)
    upload(client, "alice", [("a.jpg", _jpeg())])
    view = _train(client, webhook_url=hook.url).json()
    wait_for(client, view["id"], "succeeded")
    outbox = service.outbox()
    for _ in range(6):
        outbox.run_once()
        time.sleep(0.25)
    assert len(hook.got) == service.config.webhook_attempts
    assert not list_prefix(service.webhooks_prefix())


def test_webhooks_never_go_to_private_addresses_unless_allowed(service, monkeypatch) -> None:
    service.config.webhook_allow_private = False
    client = TestClient(create_app(service, watch=False))
    upload(client, "alice", [("a.jpg", _jpeg())])
    for url in (
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://10.0.0.8/x",
        "http://169.254.169.254/latest/meta-data/",  # the instance metadata service
        "http://[::1]/x",
        "http://[::ffff:192.168.1.1]/x",
        "https://user:pw@example.com/x",
    ):
        answer = _train(client, webhook_url=url)
        assert answer.status_code == 400, url
        assert "webhook_url" in answer.json()["error"]

    def public(host, port):
        return ["93.184.215.14"]

    def rebound(host, port):
        return ["93.184.215.14", "127.0.0.1"]

    assert check_url("https://hooks.example/x", allow_private=False, resolver=public).addresses
    with pytest.raises(WebhookUrlError, match="127.0.0.1"):
        check_url("https://hooks.example/x", allow_private=False, resolver=rebound)
    # without a signing secret no webhook is promised
    monkeypatch.delenv("AVATARFORGE_API_WEBHOOK_SECRET")
    answer = _train(client, webhook_url="https://hooks.example/x")
    assert answer.status_code == 503 and "secret" in answer.json()["error"]


# ------------------------------------------------------------------------------ forget


def test_delete_user_forgets_as_the_cli_does(client, trainer, cloud_config) -> None:
    upload(client, "alice", [("a.jpg", _jpeg())])
    upload(client, "alice2", [("a.jpg", _jpeg())])
    view = _train(client).json()
    wait_for(client, view["id"], "succeeded")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=cloud_config.bucket, Key=cloud_config.key("models", "appa-alice.tar.gz"),
                  Body=b"model")  # fmt: skip
    answer = client.delete("/v1/users/alice", headers=auth())
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["complete"] is True and report["user"] == "alice"
    assert {r["what"] for r in report["removals"]} >= {"photos", "package", "job records"}
    assert not any("appa-alice" in json.dumps(r) for r in report["removals"])
    assert client.get(f"/v1/trainings/{view['id']}", headers=auth()).status_code == 404
    assert client.get("/v1/users/alice2/photos", headers=auth()).json()["photos"]  # untouched
    assert client.delete("/v1/users/alice", headers=auth()).json()["removals"] == []


# ------------------------------------------------------------------------------ predictions


def test_predictions_refuse_bad_input_naming_the_field(client) -> None:
    cases = [
        ({"user": "alice"}, "give prompt or pack"),
        ({"user": "alice", "prompt": "x", "pack": "classic"}, "give prompt or pack"),
        ({"user": "alice", "prompt": "x", "gen_args": {"steps": 0}}, "gen_args.steps"),
        ({"user": "alice", "prompt": "x", "gen_args": {"stepz": 3}}, "did you mean"),
        ({"user": "alice", "pack": "clasic"}, "did you mean 'classic'"),
        ({"user": "alice", "prompt": "x" * 2001}, "more than 2000"),
        ({"user": "a/b", "prompt": "x"}, "not a valid user id"),
    ]
    for body, phrase in cases:
        answer = client.post("/v1/predictions", json=body, headers=auth())
        assert answer.status_code in (400, 404), (body, answer.text)
        assert phrase in answer.json()["error"], (body, answer.json())


def test_a_user_without_a_model_is_a_404(client, start_runtime, cloud_config) -> None:
    answer = client.post(
        "/v1/predictions", json={"user": "nobody", "prompt": "a photo"}, headers=auth()
    )
    assert answer.status_code == 404, answer.text
    assert "nobody has no model yet" in answer.json()["error"]


def test_sample_photos_pass_the_upload_check(client, tmp_path: Path) -> None:
    from avatarforge.testing.samples import write_samples

    photos = write_samples(tmp_path)
    answer = upload(client, "alice", [(p.name, p.read_bytes()) for p in photos])
    assert answer.status_code == 201, answer.text
    assert answer.json()["rejected"] == [] and answer.json()["photos"] == len(photos)


def test_the_page_is_self_contained(client) -> None:
    page = client.get("/")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "http" not in page.text.replace('"http', "")  # nothing from elsewhere
    script = client.get("/static/app.js").text
    assert "innerHTML" not in script and "eval(" not in script


# ------------------------------------------------------------------------------ progress


def test_a_job_writes_its_progress_and_contact_sheet_where_the_api_reads_them(
    s3_bucket, sample_dataset, sample_manifest
) -> None:
    """The training service's ProgressReport: stages, steps at most every min_interval_s (and
    the last), what preprocessing kept and rejected with reasons, and its contact sheet."""
    from avatarforge.storage import read_bytes

    prefix = f"s3://{s3_bucket}/avatarforge/"
    job = JobRequest("j1", "alice", prefix + "photos/alice/", prefix + "models/", prefix + "jobs/")
    now = [0.0]
    report = ProgressReport(job, min_interval_s=5, clock=lambda: now[0])

    def progress() -> dict:
        return json.loads(read_bytes(prefix + "jobs/j1/progress.json")[0])

    report.stage("fetch")
    assert progress()["stage"] == "fetch"
    report.preprocessed(sample_manifest, sample_dataset)
    found = progress()
    assert found["photos"]["kept"] == sample_manifest.kept_sources
    assert [r["source"] for r in found["photos"]["rejected"]] == [
        i.source for i in sample_manifest.rejected
    ]
    sheet = read_bytes(prefix + "jobs/j1/contact_sheet.png", max_bytes=2**24)[0]
    assert sheet == (sample_dataset / "contact_sheet.png").read_bytes()
    report.stage("train")
    for i, at in ((1, 1.0), (2, 2.0), (3, 7.0), (4, 8.0)):
        now[0] = at
        report.step(StepInfo(i, 5, 0.1, 0.5))
    assert progress()["step"] == 3  # 4 came within 5 s of 3
    report.step(StepInfo(5, 5, 0.1, 0.5))  # the last step is always written
    assert (progress()["step"], progress()["total"]) == (5, 5)


def test_a_training_whose_submission_failed_is_forgotten_too(client, cloud_config) -> None:
    """The API's record is written before the submission: alone, it still names the user."""
    from avatarforge.storage import write_bytes

    record = {"job_id": "appa-t1", "namespace": "appa", "user": "appa-alice"}
    write_bytes(cloud_config.jobs_prefix + "appa-t1/api.json", json.dumps(record).encode())
    report = client.delete("/v1/users/alice", headers=auth()).json()
    assert [r["what"] for r in report["removals"]] == ["job records"]
    assert not list_prefix(cloud_config.jobs_prefix)


# ------------------------------------------------------------------------------ deploy, CLI


@pytest.mark.smoke
def test_the_api_role_is_limited_to_what_the_api_calls() -> None:
    from avatarforge.deploy.api import api_policy
    from avatarforge.deploy.config import DeployConfig
    from avatarforge.deploy.run import make_plan

    config = DeployConfig(name="af", bucket="my-bucket", prefix="avatarforge/")
    plan = make_plan("api", config, create_role=True)
    assert [(r.kind, r.name) for r in plan.resources] == [("iam_role", "af-api")]
    assert make_plan("api", config).resources == []  # optional: nothing unless asked
    actions = {}
    for statement in api_policy(config, "123456789012")["Statement"]:
        assert statement["Effect"] == "Allow" and statement["Resource"] != "*"
        for action in statement["Action"]:
            actions.setdefault(action, []).extend(statement["Resource"])
    assert set(actions) == {
        "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject", "s3:DeleteObject",
        "s3:DeleteObjectVersion", "s3:ListBucket", "s3:ListBucketVersions",
        "s3:GetBucketVersioning", "sagemaker:InvokeEndpoint", "sagemaker:InvokeEndpointAsync",
    }  # fmt: skip
    for action, resources in actions.items():
        for arn in resources:
            if action.startswith("s3:") and "Bucket" not in action:
                assert arn.startswith("arn:aws:s3:::my-bucket/avatarforge/"), arn
    assert actions["sagemaker:InvokeEndpoint"] == [
        "arn:aws:sagemaker:us-east-1:123456789012:endpoint/af-mme"
    ]
    assert actions["sagemaker:InvokeEndpointAsync"] == [
        "arn:aws:sagemaker:us-east-1:123456789012:endpoint/af-training"
    ]
    # the API never writes models or async outputs (the training service does)
    assert not any("models/" in a or "async/" in a for a in actions["s3:PutObject"])


def test_cli_makes_keys_and_prints_the_plan() -> None:
    from typer.testing import CliRunner

    from avatarforge.cli import app

    made = CliRunner().invoke(app, ["api", "new-key", "Photo-App"])
    assert made.exit_code == 0, made.output
    key = made.output.split("key (shown once): ")[1].split()[0]
    entry = json.loads(made.output.strip().splitlines()[-1])
    assert entry == {"name": "Photo-App", "sha256": hash_key(key), "namespace": "photoapp"}
    assert ApiConfig.from_dict({"keys": [entry]}).keys[0].namespace == "photoapp"
    plan = CliRunner().invoke(app, ["api", "plan", "--bucket", "my-bucket", "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["facts"]["policies"]["api"]["permissions"]["Statement"]


# ------------------------------------------------------------------------------ predictions (MME)


@pytest.fixture
def mme_client(cloud_config, make_loader, start_runtime, trainer, tmp_path, monkeypatch):
    """The API with the deployment's MME on the local runtime: tritonserver's SageMaker front
    end, TargetModels from the models prefix in moto, ModelNotReadyException while one loads.
    Key A's users ``quick`` (loads at once) and ``slow`` (2 s in initialize())."""
    from fixtures.cloud import jpeg_model_archive

    from avatarforge.mme.front import Invoker
    from avatarforge.storage import publish

    for user, delay in (("quick", 0.0), ("slow", 2.0)):
        archive = jpeg_model_archive(tmp_path / "models", f"appa-{user}", load_delay=delay)
        publish(archive, cloud_config.models_prefix + archive.name)
    invoker = Invoker(make_loader(cloud_config.models_prefix), not_ready_while_loading=True)
    start_runtime(trainer, realtime={cloud_config.mme_endpoint_name: invoker})
    monkeypatch.setenv("AVATARFORGE_PACKS", str(tmp_path / "no-user-packs"))
    try:
        yield TestClient(create_app(ApiService(cloud_config, api_config()), watch=False))
    finally:
        invoker.close()


def _when_loaded(client, body, timeout=60.0):
    """POST the prediction again while it is answered 503 (as a client honouring Retry-After,
    only sooner)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = client.post("/v1/predictions", json=body, headers=auth())
        if answer.status_code != 503 or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def test_predictions_answer_images_or_503_while_the_model_loads(mme_client) -> None:
    from fixtures.cloud import prompt_color

    body = {"user": "slow", "prompt": "a photo of <<TOK>> person", "gen_args": {"num_images": 2}}
    first = mme_client.post("/v1/predictions", json=body, headers=auth())
    assert first.status_code == 503, first.text  # 2 s of loading > predict_wait_s (0.5 s)
    assert int(first.headers["Retry-After"]) == 10 and "loading" in first.json()["error"]
    answer = _when_loaded(mme_client, body)
    assert answer.status_code == 200, answer.text
    avatar = answer.json()["avatars"][0]
    assert len(avatar["images"]) == 2 and avatar["gen_args"]["num_images"] == 2
    with Image.open(io.BytesIO(base64.b64decode(avatar["images"][0]))) as image:
        assert image.format == "JPEG"
        got = image.convert("RGB").getpixel((8, 8))
    assert max(abs(a - b) for a, b in zip(got, prompt_color(body["prompt"]), strict=True)) <= 3
    # a style pack: every avatar, one request each; another key's "quick" is not A's
    pack = {"user": "quick", "pack": "professional", "gen_args": {"steps": 2}}
    answer = _when_loaded(mme_client, pack).json()
    styles = [(a["style"], a["framing"]) for a in answer["avatars"]]
    assert styles == [
        (style, framing)
        for style in ("studio", "office", "outdoors")
        for framing in ("headshot", "square-crop")
    ]
    assert all(len(a["images"]) == 1 for a in answer["avatars"])
    theirs = mme_client.post("/v1/predictions", json=pack, headers=auth(KEY_B))
    assert theirs.status_code == 404 and "has no model yet" in theirs.json()["error"]
