"""A user model on a stock Triton image: standard library and numpy only, shared files from S3.

The unit tests check the bootstrap's S3 access against botocore's own SigV4 signer and a
local credentials endpoint. The integration tests start a fresh instance the way SageMaker
would: the real tritonserver with the SageMaker front end, user models under a bare Python
(numpy only, see avatarforge.envs.bare_env), and nothing on the machine but what deploy puts
in S3 (moto): the user's tarball, the base weights tarball and the serving env tarball. The
first request for a user must succeed with no manual step.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import boto3
import pytest
from fixtures.serving import thin_env_tarball

from avatarforge.mme import MMEConfig, ModelLoadError, MultiModelLoader
from avatarforge.mme.generate import generate_request, images_from_response
from avatarforge.serving import bootstrap
from avatarforge.serving.package import upload_package
from avatarforge.serving.processes import stub_processes
from avatarforge.serving.triton_config import sd_base_name
from avatarforge.storage import upload
from avatarforge.tritonserver.sagemaker import sagemaker_triton

SMALL = {"steps": 2, "height": 64, "width": 64, "seed": 7}
STDLIB = set(sys.stdlib_module_names)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), feature_version=(3, 8))  # any Triton image's Python
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_user_model_files_import_only_what_the_stock_image_has():
    from avatarforge.serving import triton_models

    root = Path(triton_models.__file__).parent
    assert _imports(root.parent / "bootstrap.py") <= STDLIB
    # the user's model.py: its bootstrap copy, numpy and Triton's module (in the backend dir)
    extra = _imports(root / "user.py") - STDLIB
    assert extra == {"avatarforge_bootstrap", "numpy", "triton_python_backend_utils"}


def test_bootstrap_names_agree_with_the_library():
    from avatarforge import adapter
    from avatarforge.serving import schema

    assert bootstrap.ADAPTER_WEIGHTS == adapter.WEIGHTS_FILE
    assert bootstrap.ADAPTER_METADATA == adapter.METADATA_FILE
    assert schema.ADAPTER.name == bootstrap.ADAPTER_INPUT


# ---------------------------------------------------------------- SigV4 and credentials


@pytest.mark.parametrize(
    ("uri", "env", "token"),
    [
        ("s3://my-bucket/shared/env-py312.tar.gz", {}, ""),
        ("s3://my-bucket/a key/with+odd=chars~.tar.gz", {}, "session-token"),
        ("s3://dotted.bucket.name/x.tar.gz", {}, ""),
        ("s3://b-1/k.tar.gz", {"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"}, ""),
    ],
)
def test_signature_equals_botocores(uri, env, token, monkeypatch):
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    creds = {"access_key": "AKIDEXAMPLE", "secret_key": "wJalrXUtnFEMI/K7MDENG", "token": token}
    now = datetime.datetime(2026, 11, 26, 12, 34, 56, tzinfo=datetime.UTC)
    url, headers = bootstrap.signed_get(uri, creds, "eu-west-1", now=now)

    # botocore, given the same request and time, must compute the same signature
    request = AWSRequest(method="GET", url=url, headers={
        "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "X-Amz-Date": headers["x-amz-date"],
        **({"X-Amz-Security-Token": token} if token else {}),
    })  # fmt: skip
    request.context["timestamp"] = headers["x-amz-date"]
    auth = S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token or None),
                       "s3", "eu-west-1")  # fmt: skip
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    assert headers["Authorization"].endswith(f"Signature={expected}")
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date" in headers["Authorization"]
    if env:
        assert url.startswith("http://127.0.0.1:5000/b-1/")  # path style on a custom endpoint


class _CredentialsServer(BaseHTTPRequestHandler):
    """A local stand-in for the container credentials endpoint and the metadata service."""

    answer: ClassVar[dict] = {"AccessKeyId": "AK", "SecretAccessKey": "SK", "Token": "TK"}
    seen: ClassVar[list]

    def do_PUT(self):
        self.seen.append(
            ("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"))
        )
        self._send(b"imds-token")

    def do_GET(self):
        self.seen.append(("GET", self.path, self.headers.get("Authorization")
                          or self.headers.get("X-aws-ec2-metadata-token")))  # fmt: skip
        if self.path.endswith("/security-credentials/"):
            self._send(b"the-role\n")
        else:
            self._send(json.dumps(self.answer).encode())

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def credentials_server():
    _CredentialsServer.seen = []
    server = HTTPServer(("127.0.0.1", 0), _CredentialsServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _CredentialsServer.seen
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_come_in_boto3s_order(credentials_server):
    url, seen = credentials_server
    env_keys = {"AWS_ACCESS_KEY_ID": "E", "AWS_SECRET_ACCESS_KEY": "S", "AWS_SESSION_TOKEN": "T"}
    assert bootstrap.credentials(env_keys) == {"access_key": "E", "secret_key": "S", "token": "T"}
    # the container credentials endpoint, with its authorization token
    container = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": url + "/creds",
                 "AWS_CONTAINER_AUTHORIZATION_TOKEN": "secret"}  # fmt: skip
    assert bootstrap.credentials(container)["secret_key"] == "SK"
    assert ("GET", "/creds", "secret") in seen
    # the instance metadata service, v2 (token first)
    seen.clear()
    creds = bootstrap.credentials({"AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
    assert creds == {"access_key": "AK", "secret_key": "SK", "token": "TK"}
    assert seen[0] == ("PUT", "/latest/api/token", "21600")
    assert seen[-1] == ("GET", "/latest/meta-data/iam/security-credentials/the-role", "imds-token")


def test_no_credentials_anywhere_is_a_clear_error():
    with pytest.raises(bootstrap.BootstrapError, match="no AWS credentials"):
        bootstrap.credentials({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9"})


# ---------------------------------------------------------------- downloads from (moto) S3


def test_download_checks_the_hash_and_leaves_nothing_on_failure(s3_bucket, tmp_path):
    body = b"an environment tarball" * 1000
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="shared/env.tar.gz", Body=body)
    uri = f"s3://{s3_bucket}/shared/env.tar.gz"
    good = hashlib.sha256(body).hexdigest()
    assert bootstrap.download(uri, tmp_path / "env.tar.gz", sha256=good).read_bytes() == body
    with pytest.raises(bootstrap.BootstrapError, match="sha256 is"):
        bootstrap.download(uri, tmp_path / "bad.tar.gz", sha256="0" * 64)
    with pytest.raises(bootstrap.BootstrapError, match="HTTP 404"):
        bootstrap.download(f"s3://{s3_bucket}/shared/missing.tar.gz", tmp_path / "m.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.tar.gz"]  # no partial files


# ---------------------------------------------------------------- a fresh instance, from S3


@pytest.fixture(scope="module")
def s3_deployment(packaged_users, base_tarball, moto_endpoint, tmp_path_factory):
    """What deploy leaves in S3: user tarballs, the base tarball, the serving env tarball."""
    from avatarforge.testing.aws_local import dummy_aws_env, reset

    reset(moto_endpoint)
    env = dummy_aws_env(moto_endpoint)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    s3.create_bucket(Bucket="deployment")
    prefix = "s3://deployment/avatarforge"
    tarball = thin_env_tarball(tmp_path_factory.mktemp("env"))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for user, package in packaged_users.items():
            upload_package(package, f"{prefix}/models/{user}.tar.gz")  # + its .sha256
        upload(base_tarball, f"{prefix}/shared/base.tar.gz")
        upload(tarball, f"{prefix}/shared/serve-env.tar.gz")
    instance = {  # the SageMaker Model's environment, as deploy writes it
        **env,
        bootstrap.ENV_BASE_SOURCE: f"{prefix}/shared/base.tar.gz",
        bootstrap.ENV_ENV_SOURCE: f"{prefix}/shared/serve-env.tar.gz",
        bootstrap.ENV_ENV_SHA256: hashlib.sha256(tarball.read_bytes()).hexdigest(),
        bootstrap.ENV_ENV_PYTHON: bootstrap.stub_python(),
    }
    return prefix, instance


def _as_sagemaker(monkeypatch, instance: dict) -> None:
    """This process plays SageMaker (it fetches TargetModels): the same AWS endpoint."""
    for key, value in instance.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


@pytest.mark.integration
def test_fresh_instance_serves_a_user_from_s3_alone(
    s3_deployment, tiny_base, tmp_path, monkeypatch
):
    prefix, instance = s3_deployment
    _as_sagemaker(monkeypatch, instance)
    shared = tmp_path / "shared"
    env = {**instance, bootstrap.ENV_SHARED_DIR: str(shared)}
    with sagemaker_triton(tmp_path, extra_env=env) as server:
        loader = MultiModelLoader(server.sagemaker_url, f"{prefix}/models/", tmp_path / "models",
                                  MMEConfig(load_timeout_s=300))  # fmt: skip
        try:
            request = generate_request("a photo of <<TOK>> person", gen_args=SMALL)
            (image,) = images_from_response(loader.invoke("alice.tar.gz", request))
            assert image.size == (64, 64) and image.format == "JPEG"
            (image,) = images_from_response(loader.invoke("bob.tar.gz", request))
            assert image.size == (64, 64)
            # what the first model fetched: the env, extracted once (sha256-named), the base
            env_dir = shared / "env" / f"serve-{instance[bootstrap.ENV_ENV_SHA256][:16]}"
            assert [p.name for p in (shared / "env").iterdir()] == [env_dir.name]
            assert (shared / "base" / tiny_base.content_hash[:16] / "model_index.json").is_file()
            # the user models ran under the bare Python, the shared base in the serving env
            stubs = {s.instance.rsplit("_", 2)[0]: s for s in stub_processes(server.pid)}
            base = stubs.pop(sd_base_name(tiny_base.content_hash))
            assert base.maps_library("libtorch")
            # Triton was handed that folder: nothing extracted again into its temp dir
            assert base.environ()["VIRTUAL_ENV"] == str(env_dir)
            assert len(stubs) == 2
            for stub in stubs.values():
                assert not stub.maps_library("libtorch"), "a user model imported torch"
                assert stub.environ()["PATH"].split(":")[0].endswith("/bin")
                assert "bare-py" in stub.environ()["PATH"].split(":")[0]
                assert stub.private_dirty_bytes() < 25 * 2**20, stub
        finally:
            loader.unload_all()


@pytest.mark.integration
def test_env_for_another_python_is_refused_with_how_to_fix(s3_deployment, tmp_path, monkeypatch):
    prefix, instance = s3_deployment
    _as_sagemaker(monkeypatch, instance)
    env = {**instance, bootstrap.ENV_SHARED_DIR: str(tmp_path / "shared"),
           bootstrap.ENV_ENV_PYTHON: "3.99"}  # fmt: skip
    with sagemaker_triton(tmp_path, extra_env=env) as server:
        loader = MultiModelLoader(server.sagemaker_url, f"{prefix}/models/", tmp_path / "models")
        request = generate_request("a photo of <<TOK>> person", gen_args=SMALL)
        with pytest.raises(ModelLoadError, match=r"built for Python 3\.99.*build_in_image\.sh"):
            loader.invoke("alice.tar.gz", request)
        assert loader.loaded() == []
        assert not (tmp_path / "shared" / "env").exists()  # refused before any download
