"""The serving library outside any server: schema/configs, request handling, adapter cache,
shared files, packaging."""

from __future__ import annotations

import http.server
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from avatarforge.adapter import AdapterError
from avatarforge.base.identity import BaseError, BaseInfo, content_hash
from avatarforge.generate import GenArgs, from_jpeg_base64
from avatarforge.serving import schema
from avatarforge.serving.adapter_cache import AdapterCache
from avatarforge.serving.bootstrap import (
    BootstrapError,
    Instance,
    SharedBaseModel,
    ensure_env,
    read_user_model,
)
from avatarforge.serving.config import ServingConfig
from avatarforge.serving.handler import (
    RequestError,
    handle_requests,
    parse_request,
    request_cost,
)
from avatarforge.serving.package import PackageError, package_user
from avatarforge.serving.shared_files import SharedFilesError, ensure_base
from avatarforge.serving.triton_config import (
    checked_in_setup_config,
    parse_pbtxt,
    sd_base_config,
    to_pbtxt,
    user_model_config,
)
from avatarforge.settings import ConfigError
from avatarforge.testing.aws_local import dummy_aws_env

# ---------------------------------------------------------------- schema and configs


def test_user_config_is_rendered_from_the_schema():
    config = parse_pbtxt(to_pbtxt(user_model_config("alice", "b", "h" * 64)))
    assert config["name"] == "alice"
    assert config["max_batch_size"] == schema.MAX_BATCH_SIZE
    inputs = {i["name"]: i.get("optional", False) for i in config["input"]}
    assert inputs == {s.name: s.optional for s in schema.INPUTS}
    assert [o["name"] for o in config["output"]] == ["generated_image"]
    assert config["parameters"]["BASE_HASH"]["string_value"] == "h" * 64
    # no machine paths and no environment: it runs under the instance's bare Python
    assert set(config["parameters"]) == {"BASE_ID", "BASE_HASH"}


def test_the_shared_base_config_is_the_same_from_every_package(
    trained_adapter, tiny_base, tmp_path
):
    # the shared base is one process per base hash: whichever user model starts it, it must
    # start the same config (and a package cannot set its limits, placement or environment)
    config = sd_base_config("b", "h" * 64)
    assert config["instance_group"] == [{"kind": "KIND_AUTO", "count": 1}]
    assert set(config["parameters"]) == {"BASE_ID", "BASE_HASH"}
    assert {"adapter", "deadline", "auth"} <= {i["name"] for i in config["input"]}
    with_env = sd_base_config("b", "h" * 64, env_path="/env")
    assert with_env["parameters"]["EXECUTION_ENV_PATH"] == {"string_value": "/env"}
    templates = []
    for rows in (8, 2):
        tarball = package_user("u1", trained_adapter, tmp_path / str(rows), base=tiny_base,
                               serving=ServingConfig(max_batch_size=rows))  # fmt: skip
        with tarfile.open(tarball) as tar:
            templates.append(json.load(tar.extractfile("u1/1/shared_base.json")))
    assert templates[0] == templates[1] == sd_base_config(tiny_base.base_id, tiny_base.content_hash)
    # a template that tries anyway (an older package, an edited one) is started as the instance's
    hostile = json.loads(json.dumps(templates[0]))
    hostile["parameters"]["MAX_REQUEST_COST"] = {"string_value": "1000000"}
    hostile["parameters"]["EXECUTION_ENV_PATH"] = {"string_value": "/tmp/evil.tar.gz"}
    hostile["instance_group"] = [{"kind": "KIND_GPU", "count": 4}]
    started = [
        json.loads(SharedBaseModel.from_template(t, "/envs/serve", tmp_path).config_json)
        for t in (templates[0], hostile)
    ]
    assert started[0] == started[1]
    assert started[0]["parameters"]["EXECUTION_ENV_PATH"] == {"string_value": "/envs/serve"}


def test_the_instance_settings_come_from_its_environment():
    from avatarforge.serving import bootstrap
    from avatarforge.serving.config import INSTANCE_FIELDS, PACKAGED

    assert ServingConfig.from_env({}) == ServingConfig()
    custom = ServingConfig(request_timeout_s=5, max_request_cost=50, adapter_cache_mib=512,
                           batching=False, batch_max_images=4, device="cpu")  # fmt: skip
    env = custom.to_env()
    assert env["AVATARFORGE_SERVING_BATCHING"] == "false"
    assert env["AVATARFORGE_SERVING_REQUEST_TIMEOUT_S"] == "5"
    assert ServingConfig.from_env(env) == custom
    # a package's own field is not the instance's to set, nor the other way round
    assert "AVATARFORGE_SERVING_MAX_BATCH_SIZE" not in env and PACKAGED == ("max_batch_size",)
    assert ServingConfig.from_env({"AVATARFORGE_SERVING_MAX_BATCH_SIZE": "2"}).max_batch_size == 8
    assert set(INSTANCE_FIELDS) | set(PACKAGED) == set(ServingConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match="AVATARFORGE_SERVING_BATCH_MAX_IMAGES"):
        ServingConfig.from_env({"AVATARFORGE_SERVING_BATCH_MAX_IMAGES": "0"})
    with pytest.raises(ValueError, match="AVATARFORGE_SERVING_ADAPTER_CACHE_MIB"):
        ServingConfig.from_env({"AVATARFORGE_SERVING_ADAPTER_CACHE_MIB": "lots"})
    # the user model reads two of them without the library: the same names and defaults
    assert ServingConfig.env_name("request_timeout_s") == bootstrap.ENV_REQUEST_TIMEOUT_S
    assert ServingConfig().request_timeout_s == bootstrap.DEFAULT_REQUEST_TIMEOUT_S
    assert ServingConfig.env_name("metrics_log_s") == bootstrap.ENV_METRICS_LOG_S
    assert ServingConfig().metrics_log_s == bootstrap.DEFAULT_METRICS_LOG_S
    assert bootstrap.Instance(env).request_timeout_s == 5
    with pytest.raises(BootstrapError, match="AVATARFORGE_SERVING_REQUEST_TIMEOUT_S"):
        bootstrap.Instance({"AVATARFORGE_SERVING_REQUEST_TIMEOUT_S": "a day"})


def test_model_params_are_written_and_read_by_one_type():
    from avatarforge.serving.config import ModelParams

    shared = ModelParams("tiny@seed0", "a" * 64, "/envs/serve")
    config = sd_base_config("tiny@seed0", "a" * 64, env_path="/envs/serve")
    rendered = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert rendered == shared.to_params()
    assert ModelParams.from_params(rendered) == shared
    user = {
        k: v["string_value"]
        for k, v in user_model_config("alice", "b", "c" * 64)["parameters"].items()
    }
    assert ModelParams.from_params(user) == ModelParams("b", "c" * 64)
    assert ModelParams.of_model({"model_config": json.dumps(config)}) == shared


def test_checked_in_model_setup_config_matches_the_schema(repo_root):
    text = (repo_root / "model_repository" / "model_setup" / "config.pbtxt").read_text()
    assert text == checked_in_setup_config()
    assert "EXECUTION_ENV_PATH" not in parse_pbtxt(text).get("parameters", {})  # no paths


# ---------------------------------------------------------------- request handling


def _req(**columns):
    return {k: np.array([[v.encode()] for v in vs], dtype=object) for k, vs in columns.items()}


def test_a_request_over_the_work_budget_is_refused_before_any_work():
    big = json.dumps({"height": 1024, "width": 1024, "steps": 150})  # 600 units a row
    one = parse_request(_req(prompt=["a"], gen_args=[big]))
    assert request_cost(one.rows) == 600  # the budget is inclusive
    calls: list = []
    two = _req(prompt=["a", "b"], gen_args=[big, big])
    (error,) = handle_requests([two], _fake_generate(calls))
    assert isinstance(error, RequestError) and error.client_fault
    assert "1200" in str(error) and "serving.max_request_cost" in str(error)
    assert calls == []  # refused before anything ran
    assert parse_request(two, max_cost=1200)  # a package may allow more


def _fake_generate(calls):
    from PIL import Image

    def generate(prompt, negative, args, adapter):
        calls.append((prompt, negative, args, adapter))
        return [
            Image.new("RGB", (args.width, args.height), (args.seed % 256, 0, 0))
        ] * args.num_images

    return generate


def test_omitted_optional_inputs_take_defaults():
    parsed = parse_request(_req(prompt=["hi"]))
    assert parsed.rows[0].negative_prompt is None
    assert parsed.rows[0].args == GenArgs()
    assert parsed.adapter is None


def test_every_row_and_request_is_answered():
    calls = []
    requests = [
        _req(
            prompt=["a", "b"], gen_args=['{"seed": 1, "height": 64}', '{"seed": 2, "height": 64}']
        ),
        _req(prompt=["c"], negative_prompt=["x"], gen_args=['{"num_images": 2, "width": 64}']),
    ]
    results = handle_requests(requests, _fake_generate(calls))
    assert [r.shape for r in results] == [(2, 1), (1, 2)]
    assert [c[0] for c in calls] == ["a", "b", "c"]
    assert from_jpeg_base64(results[0][1][0]).size == (512, 64)


def test_bad_request_fails_alone_and_names_the_field():
    calls = []
    requests = [
        _req(prompt=["a"], gen_args=['{"steps": 500}']),
        _req(prompt=["b"]),
        _req(prompt=["c"], gen_args=["[1]"]),
        {"negative_prompt": np.array([[b"x"]], dtype=object)},
        _req(prompt=["  "]),
    ]
    results = handle_requests(requests, _fake_generate(calls))
    assert isinstance(results[1], np.ndarray)
    errors = [str(r) for r in results if isinstance(r, RequestError)]
    assert len(errors) == 4
    assert "gen_args.steps" in errors[0]
    assert "gen_args: must be a JSON object" in errors[1]
    assert "prompt: required" in errors[2]
    assert "prompt: must not be empty" in errors[3]


def test_unexpected_failure_is_an_error_not_a_success(caplog):
    def broken(*_):
        raise RuntimeError("out of memory in /opt/ml/secret/path")

    with caplog.at_level("ERROR"):
        (result, client) = handle_requests(
            [_req(prompt=["a"]), _req(prompt=["b"], gen_args=['{"steps": 0}'])], broken
        )
    assert isinstance(result, RequestError) and not result.client_fault
    # the client learns it was our failure and where to look, not our paths or exception text
    assert str(result).startswith("internal error (reference ")
    assert "secret" not in str(result) and "RuntimeError" not in str(result)
    reference = str(result).split("reference ")[1].split(" ")[0]
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)
    assert isinstance(client, RequestError) and client.client_fault  # gen_args.steps


def test_rows_of_one_request_must_agree():
    with pytest.raises(RequestError, match="num_images"):
        parse_request(_req(prompt=["a", "b"], gen_args=['{"num_images": 2}', "{}"]))


# ---------------------------------------------------------------- adapter cache


class FakePipe:
    def __init__(self):
        self.active, self.enabled, self.layers = None, True, set()

    def set_adapters(self, names):
        self.active = names

    def disable_lora(self):
        self.enabled = False

    def enable_lora(self):
        self.enabled = True


def _cache(capacity, fail_for=()):
    log = []

    def load(pipe, folder, base, name):
        if folder.name in fail_for:
            pipe.layers.add(name)  # a half-done load
            raise AdapterError(f"{folder} is not a complete adapter")
        pipe.layers.add(name)
        log.append(("load", folder.name))

    def unload(pipe, name):
        if name not in pipe.layers:
            raise AdapterError("not loaded")
        pipe.layers.remove(name)
        log.append(("unload", name))

    pipe = FakePipe()
    return AdapterCache(pipe, BaseInfo("b", "h", None), capacity, load=load, unload=unload), log


def test_adapter_cache_evicts_the_least_recently_used(tmp_path):
    cache, log = _cache(2)
    a, b, c = (str(tmp_path / n) for n in "abc")
    cache.activate(a)
    cache.activate(b)
    cache.activate(a)  # a is now the most recent
    cache.activate(c)  # evicts b
    assert cache.loaded == [a, c]
    assert [e[0] for e in log] == ["load", "load", "unload", "load"]
    cache.activate(None)
    assert cache.pipe.enabled is False
    cache.activate(a)
    assert cache.pipe.enabled is True and len(cache.pipe.active) == 1


def test_adapter_replaced_in_the_same_folder_is_loaded_again(tmp_path):
    # SageMaker MME unpacks an updated <user>.tar.gz to the old user's folder
    from avatarforge.adapter import WEIGHTS_FILE

    cache, log = _cache(2)
    folder = tmp_path / "alice"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(b"old")
    cache.activate(str(folder))
    cache.activate(str(folder))  # unchanged: no second load
    assert [e[0] for e in log] == ["load"]
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).write_bytes(b"new!")  # a new file, as extraction writes it
    cache.activate(str(folder))
    assert [e[0] for e in log] == ["load", "unload", "load"]
    assert cache.loaded == [str(folder)]


def test_failed_adapter_load_leaves_nothing_behind(tmp_path):
    cache, _ = _cache(2, fail_for={"broken"})
    with pytest.raises(AdapterError, match="broken"):
        cache.activate(str(tmp_path / "broken"))
    assert cache.loaded == [] and cache.pipe.layers == set()
    cache.activate(str(tmp_path / "ok"))
    assert len(cache.loaded) == 1


# ---------------------------------------------------------------- shared files


def test_base_from_a_folder_is_linked_and_verified(tiny_base, tmp_path):
    info = ensure_base(str(tiny_base.path), tmp_path, expected_hash=tiny_base.content_hash)
    assert info.content_hash == tiny_base.content_hash
    assert (tmp_path / "base" / tiny_base.content_hash[:16]).is_symlink()
    with pytest.raises(SharedFilesError, match="expected"):
        ensure_base(str(tiny_base.path), tmp_path / "other", expected_hash="0" * 64)
    assert not (tmp_path / "other" / "base" / ("0" * 16)).exists()


def test_base_from_a_tarball_without_hash_is_found_again_by_hash(base_tarball, tiny_base, tmp_path):
    first = ensure_base(str(base_tarball), tmp_path)  # model_setup: no hash known
    assert first.content_hash == tiny_base.content_hash
    # a user model names the hash and finds the same copy without fetching again
    again = ensure_base("", tmp_path, expected_hash=tiny_base.content_hash)
    assert again.path == first.path
    assert [p.name for p in (tmp_path / "base").iterdir() if not p.name.endswith(".hash")] == [
        tiny_base.content_hash[:16]
    ]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SharedFilesError, match="AVATARFORGE_BASE_SOURCE"):
        ensure_base("", tmp_path, expected_hash="a" * 64)


def _ensure_in_child(args):
    source, shared, expected = args
    return str(ensure_base(source, shared, expected_hash=expected).path)


def test_concurrent_ensures_install_once(base_tarball, tiny_base, tmp_path):
    jobs = [(str(base_tarball), tmp_path, tiny_base.content_hash)] * 4
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_ensure_in_child, jobs)
    assert len(set(paths)) == 1
    leftovers = [p.name for p in (tmp_path / "base").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_env_source(tmp_path):
    def instance(source, python=""):
        return Instance(
            {"AVATARFORGE_ENV_SOURCE": source, "AVATARFORGE_ENV_PYTHON": python,
             "AVATARFORGE_SHARED_DIR": str(tmp_path / "shared")}
        )  # fmt: skip

    assert ensure_env(instance("")) == ""  # no env configured: the shared base inherits
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    with pytest.raises(BootstrapError, match="bin/activate"):
        ensure_env(instance(str(venv)))
    (venv / "bin" / "activate").write_text("")
    assert ensure_env(instance(str(venv))) == str(venv.resolve())
    assert ensure_env(instance(f"file://{venv}")) == str(venv.resolve())
    with pytest.raises(BootstrapError, match="does not exist"):
        ensure_env(instance(str(tmp_path / "nowhere.tar.gz")))
    # an env built for another Python than the stub's is refused, saying how to build one
    with pytest.raises(BootstrapError, match=r"built for Python 2\.7.*build_in_image\.sh"):
        ensure_env(instance(str(venv), python="2.7"))


# ---------------------------------------------------------------- packaging


def test_package_layout_is_what_mme_untars(packaged_users, tiny_base):
    with tarfile.open(packaged_users["alice"]) as tar:
        names = tar.getnames()
        config = parse_pbtxt(tar.extractfile("alice/config.pbtxt").read().decode())
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert set(names) == {
        "alice", "alice/config.pbtxt", "alice/1", "alice/1/model.py",
        "alice/1/avatarforge_bootstrap.py", "alice/1/shared_base.json", "alice/1/adapter",
        "alice/1/adapter/pytorch_lora_weights.safetensors",
        "alice/1/adapter/avatarforge_adapter.json",
    }  # fmt: skip
    assert config["parameters"]["BASE_HASH"]["string_value"] == tiny_base.content_hash


def test_package_bytes_are_reproducible(trained_adapter, tiny_base, tmp_path):
    one = package_user("u1", trained_adapter, tmp_path / "a", base=tiny_base)
    two = package_user("u1", trained_adapter, tmp_path / "b", base=tiny_base)
    assert one.read_bytes() == two.read_bytes()


def test_package_refuses_another_base_and_bad_names(trained_adapter, tiny_base, tmp_path):
    other = BaseInfo("other", "f" * 64, tmp_path)
    with pytest.raises(BaseError, match="trained on base"):
        package_user("u1", trained_adapter, tmp_path, base=other)
    for bad in ("../x", "model_setup", "sd_base_x", "a b", ""):
        with pytest.raises(PackageError):
            package_user(bad, trained_adapter, tmp_path, base=tiny_base)
    assert list(tmp_path.glob("*.tar.gz")) == []


def test_user_model_checks_its_adapter_against_its_config(trained_adapter, tmp_path):
    import shutil

    shutil.copytree(trained_adapter, tmp_path / "1" / "adapter")
    meta = json.loads((tmp_path / "1" / "adapter" / "avatarforge_adapter.json").read_text())
    assert read_user_model(tmp_path / "1", meta["base_hash"]).is_dir()
    with pytest.raises(BootstrapError, match="trained on base"):
        read_user_model(tmp_path / "1", "f" * 64)
    with pytest.raises(BootstrapError, match="BASE_HASH"):
        read_user_model(tmp_path / "1", "")
    (tmp_path / "1" / "adapter" / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(BootstrapError, match="safetensors is missing"):
        read_user_model(tmp_path / "1", meta["base_hash"])


def test_nan_and_huge_texts_are_refused_by_name():
    for bad in ('{"guidance_scale": NaN}', '{"guidance_scale": Infinity}'):
        (result,) = handle_requests([_req(prompt=["a"], gen_args=[bad])], _fake_generate([]))
        assert isinstance(
            result, RequestError
        ) and "gen_args.guidance_scale: must be a finite" in str(result)
    calls = []
    (long_prompt, long_negative) = handle_requests(
        [_req(prompt=["a" * 5_000_000]), _req(prompt=["a"], negative_prompt=["n" * 3000])],
        _fake_generate(calls),
    )
    assert "prompt: longer than 2000 characters" in str(long_prompt)
    assert "negative_prompt: longer than" in str(long_negative)
    assert calls == []  # refused before any work


class _StallingS3(http.server.BaseHTTPRequestHandler):
    """Answers every object request with the start of a large body, then never finishes."""

    def log_message(self, *args) -> None:
        pass

    def _head(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(50 * 2**20))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._head()

    def do_GET(self) -> None:
        self._head()
        self.wfile.write(b"\x1f\x8b" + b"\0" * 65534)
        self.wfile.flush()
        time.sleep(60)


def test_a_fetch_killed_half_way_leaves_nothing_used(base_tarball, tiny_base, tmp_path):
    # a process fetching the base from S3 is SIGKILLed mid-download; the next ensure-step (any
    # process) removes its unfinished folder and installs the base whole
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    code = (
        "import sys; from avatarforge.serving.shared_files import ensure_base; "
        "ensure_base('s3://bucket/base.tar.gz', sys.argv[1], expected_hash=sys.argv[2])"
    )
    env = {**os.environ, **dummy_aws_env(endpoint), "AWS_MAX_ATTEMPTS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), tiny_base.content_hash], env=env
    )
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "base").glob(".base.partial-*")):  # made, then the fetch
            assert child.poll() is None and time.monotonic() < deadline, "no fetch started"
            time.sleep(0.05)
        time.sleep(0.5)
        assert child.poll() is None  # still fetching: the stalled body never ends
    finally:
        child.kill()
        child.wait()
        server.shutdown()
    assert list((tmp_path / "base").glob(".base.partial-*"))  # what the kill left
    info = ensure_base(str(base_tarball), tmp_path, expected_hash=tiny_base.content_hash)
    assert info.content_hash == tiny_base.content_hash
    assert not list((tmp_path / "base").glob(".base.partial-*"))


@pytest.mark.parametrize(
    "cmdline, refused",
    [
        (["/opt/tritonserver/bin/tritonserver", "--model-repository=/m"], True),  # none
        (["tritonserver", "--model-control-mode=poll"], True),
        (["tritonserver", "--model-control-mode", "explicit", "--load-model=alice"], False),
        (["tritonserver", "--model-control-mode=explicit", "--allow-sagemaker=true"], False),
        (None, False),  # not under tritonserver (server_cmdline() is None): nothing to check
    ],
)
def test_user_models_refuse_a_server_that_cannot_load_the_shared_base(cmdline, refused):
    from avatarforge.serving.bootstrap import BootstrapError, check_control_mode

    if refused:
        with pytest.raises(BootstrapError, match="needs --model-control-mode=explicit"):
            check_control_mode(cmdline)
    else:
        check_control_mode(cmdline)


def test_a_model_loaded_at_start_leaves_the_shared_base_to_the_first_request():
    from avatarforge.serving.bootstrap import loaded_at_start

    assert loaded_at_start("alice", ["tritonserver", "--load-model=alice"])
    assert loaded_at_start("alice", ["tritonserver", "--load-model", "*"])
    assert not loaded_at_start("alice", ["tritonserver", "--load-model=bob"])
    assert not loaded_at_start("alice", None)


def test_requests_past_their_deadline_are_skipped_without_work():
    import time as _time

    from avatarforge.serving.handler import handle_batched

    ran = []

    def run(jobs):
        ran.extend(jobs)
        return [["image"] for _ in jobs]

    def request(deadline):
        return {
            "prompt": np.array([[b"a photo"]], dtype=object),
            "deadline": np.array([[f"{deadline:.3f}".encode()]], dtype=object),
        }

    now = _time.time()
    results = handle_batched([request(now - 1), request(now + 60)], run, lambda a: True)
    assert results[0].status == 503 and "serving.request_timeout_s" in str(results[0])
    assert [job.request for job in ran] == [1]  # the expired one never ran
    bad = handle_batched([{**request(now), "deadline": np.array([[b"soon"]], dtype=object)}],
                         run, lambda a: True)  # fmt: skip
    assert bad[0].status == 400 and "deadline" in str(bad[0])


def _flip_a_byte_keeping_size_and_time(folder: Path) -> Path:
    weights = max((p for p in folder.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    return weights


def test_a_corrupt_base_is_found_by_the_shared_base_and_fetched_again(
    base_tarball, tiny_base, tmp_path
):
    first = ensure_base(str(base_tarball), tmp_path, expected_hash=tiny_base.content_hash)
    weights = _flip_a_byte_keeping_size_and_time(first.path)
    # the size+time stamp cannot see it; the shared base's start (verify) reads every byte
    assert ensure_base(str(base_tarball), tmp_path, expected_hash=tiny_base.content_hash).path
    again = ensure_base(
        str(base_tarball), tmp_path, expected_hash=tiny_base.content_hash, verify=True
    )
    assert again.content_hash == tiny_base.content_hash
    assert content_hash(again.path) == tiny_base.content_hash  # the bytes, fetched again
    assert weights.read_bytes() == (tiny_base.path / weights.relative_to(again.path)).read_bytes()
    # without a source to fetch from, a corrupt copy is an error, never served
    _flip_a_byte_keeping_size_and_time(again.path)
    with pytest.raises(SharedFilesError, match="corrupt"):
        ensure_base("", tmp_path, expected_hash=tiny_base.content_hash, verify=True)


def test_a_read_only_shared_dir_with_the_base_present_is_used(base_tarball, tiny_base, tmp_path):
    import shutil as _shutil
    import subprocess as _subprocess

    from avatarforge.serving.bootstrap import file_lock

    shared = tmp_path / "shared"
    ensure_base(str(base_tarball), shared, expected_hash=tiny_base.content_hash)
    _shutil.rmtree(shared / ".locks")
    # read-only even for root (the tests run as root here): the immutable attribute
    if _subprocess.run(["chattr", "-R", "+i", str(shared)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(OSError):
            (shared / "probe").touch()
        info = ensure_base("", shared, expected_hash=tiny_base.content_hash, verify=True)
        assert info.content_hash == tiny_base.content_hash
        with file_lock(shared, "sd_base_x"):  # the models' locks live elsewhere
            pass
    finally:
        _subprocess.run(["chattr", "-R", "-i", str(shared)], check=True)


# ---------------------------------------------------------------- Triton's answers, any core


class _Core:
    """A stand-in for Triton's module with what model_ready uses (the real one lives only in a
    python backend stub): is_model_ready as core 2.51-2.69 answers (False) or as cores from
    mid-2026 do (TritonModelException for a model that is not loaded)."""

    class TritonModelException(Exception):
        pass

    def __init__(self, answer):
        self.answer = answer

    def is_model_ready(self, name):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_a_model_that_is_not_loaded_is_not_ready_on_every_core():
    from avatarforge.serving.bootstrap import model_ready

    unknown = _Core.TritonModelException(
        "Failed to check model readiness: Failed to process the request for model 'alice_0_0', "
        "message: Request for unknown model: 'sd_base_x' is not found"
    )
    assert model_ready(_Core(True), "sd_base_x") is True
    assert model_ready(_Core(False), "sd_base_x") is False  # up to 2.69
    assert model_ready(_Core(unknown), "sd_base_x") is False  # 2.70+ (core 73aad7c)
    with pytest.raises(_Core.TritonModelException, match="Server not ready"):
        model_ready(_Core(_Core.TritonModelException("Server not ready")), "sd_base_x")


def test_every_answer_to_retry_travels_as_unavailable_and_the_rest_as_what_they_are():
    from avatarforge.serving import bootstrap
    from avatarforge.serving.handler import DeadlineExceeded, InternalError
    from avatarforge.serving.shared_base import BaseLoading, error_message

    class Codes:
        class TritonError:
            INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

    loading = BaseLoading("the shared base model is loading (3 s so far); retry")
    retry = [bootstrap.BASE_RESTARTED, bootstrap.BASE_STARTING, bootstrap.BASE_NOT_READY,
             error_message(DeadlineExceeded("stopped after 3 denoising steps")),
             error_message(loading)]  # fmt: skip
    for message in retry:
        assert message.startswith(bootstrap.RETRY_PREFIX), message
        assert bootstrap.error_code(message, Codes) == "UNAVAILABLE"
    assert error_message(BaseLoading("the shared base model is loading")).startswith(
        bootstrap.BASE_LOADING
    )
    refused = error_message(RequestError("gen_args.steps: must be >= 1 (got 0)"))
    assert bootstrap.error_code(refused, Codes) == "INVALID_ARG"
    assert bootstrap.error_code(error_message(InternalError("internal error")), Codes) == "INTERNAL"
    counted = {m: bootstrap.outcome(m) for m in (None, refused, retry[3], retry[0], "boom")}
    assert list(counted.values()) == ["served", "refused", "timed_out", "unavailable", "failed"]
    # Triton's own words for a dead or missing shared base, bare or wrapped
    dead = ["Stub process 'sd_base_x_0_0' is not healthy.", "Stub process is not healthy.",
            "Failed to process the request(s) for model instance 'sd_base_x_0_0', message: "
            "Stub process 'sd_base_x_0_0' is not healthy."]  # fmt: skip
    assert all(bootstrap.base_died(m) for m in dead)
    missing = ["Failed for execute the inference request. Model 'sd_base_x' is not ready.",
               "Request for unknown model: 'sd_base_x' has no available versions"]  # fmt: skip
    assert all(bootstrap.base_not_ready(m) for m in missing)
    # the shared base's own answers never count as Triton's, whatever their text
    assert not bootstrap.base_not_ready(bootstrap.CLIENT_FAULT_PREFIX + "prompt: is not ready")


# ---------------------------------------------------------------- the answer's size


def test_the_jpeg_bound_holds_for_noise_at_every_kind_of_size():
    import base64

    from PIL import Image

    from avatarforge.generate import to_jpeg_base64
    from avatarforge.serving.handler import JPEG_BYTES_PER_PIXEL, JPEG_HEADER_BYTES

    rng = np.random.default_rng(0)
    for height, width in ((64, 64), (72, 104), (64, 1024), (1024, 1024)):
        worst = 0
        for pixels in (
            rng.integers(0, 2, (height, width, 3)) * 255,  # each channel 0 or 255: the worst
            rng.integers(0, 256, (height, width, 3)),
        ):
            image = Image.fromarray(pixels.astype(np.uint8))
            worst = max(worst, len(base64.b64decode(to_jpeg_base64(image))))
        bound = JPEG_BYTES_PER_PIXEL * height * width + JPEG_HEADER_BYTES
        assert worst <= bound, (height, width, worst, bound)
        assert worst > 0.9 * JPEG_BYTES_PER_PIXEL * height * width - JPEG_HEADER_BYTES  # tight


def test_a_request_whose_answer_could_pass_6_mb_is_refused_before_any_work():
    from avatarforge.serving.handler import response_bytes

    def rows(n, size, images):
        args = json.dumps({"height": size, "width": size, "num_images": images, "steps": 1})
        return _req(prompt=["a"] * n, gen_args=[args] * n)

    assert response_bytes(parse_request(rows(1, 1024, 2)).rows) < 6 * 2**20  # 4.2 MB
    assert response_bytes(parse_request(rows(8, 512, 1)).rows) < 6 * 2**20  # 4.2 MB
    calls: list = []
    for too_big in (rows(1, 1024, 3), rows(2, 512, 8)):
        (error,) = handle_requests([too_big], _fake_generate(calls))
        assert isinstance(error, RequestError) and error.client_fault
        assert "serving.max_response_bytes" in str(error) and "6291456" in str(error)
    assert calls == []
    assert parse_request(rows(1, 1024, 3), max_response_bytes=8 * 2**20)  # an instance may allow


def test_the_contract_states_the_answers_limit():
    assert "6291456" in schema.contract_markdown()
    assert "AVATARFORGE_SERVING_" in schema.contract_markdown()


# ---------------------------------------------------------------- who may call the shared base


def _key_in_child(shared: str) -> bytes:
    from avatarforge.serving.bootstrap import instance_key

    return instance_key(Path(shared))


def test_the_instance_key_is_made_once_0600_and_refused_when_others_may_read_it(tmp_path):
    from avatarforge.serving.bootstrap import KEY_FILE, instance_key, lock_folder

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(_key_in_child, [str(tmp_path)] * 8)
    assert len(set(keys)) == 1 and len(keys[0]) == 32  # concurrent first readers agree
    path = lock_folder(tmp_path) / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert instance_key(tmp_path) == keys[0]
    path.chmod(0o644)
    with pytest.raises(BootstrapError, match="mode 0600"):
        instance_key(tmp_path)


@pytest.fixture
def served_folder(packaged_users, tmp_path) -> Path:
    """alice's model folder as the MME unpacks it, with what the stub writes when it loads."""
    from avatarforge.serving.package import unpack_package

    model = unpack_package(packaged_users["alice"], tmp_path / "opt-ml" / "h" / "model")
    (model / "1" / "__pycache__").mkdir()
    (model / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    return model


def test_the_shared_base_takes_calls_only_from_its_user_models(served_folder, tiny_base, tmp_path):
    from avatarforge.serving.bootstrap import CALLER_REFUSED, CLIENT_FAULT_PREFIX, caller_mac
    from avatarforge.serving.callers import Callers

    key, now = os.urandom(32), time.time()
    callers = Callers(lambda: key, tiny_base.content_hash, request_timeout_s=60)
    adapter = str((served_folder / "1" / "adapter").resolve())

    def request(adapter=adapter, deadline=f"{now + 30:.3f}", auth=None, key=key):
        auth = auth if auth is not None else caller_mac(key, adapter, deadline)
        return _req(prompt=["a"], adapter=[adapter], deadline=[deadline], auth=[auth])

    assert callers.check(request()) == "alice"
    assert callers.check(request()) == "alice"  # remembered: not checked again
    link = tmp_path / "link"
    link.symlink_to(served_folder)
    copy = tmp_path / "copy" / "alice"
    shutil.copytree(served_folder, copy)
    (copy / "1" / "model.py").write_text("import os\n")
    other_base = Callers(lambda: key, "f" * 64, request_timeout_s=60)
    refusals = {
        "no auth": {k: v for k, v in request().items() if k != "auth"},
        "no deadline": {k: v for k, v in request().items() if k != "deadline"},
        "another key": request(key=os.urandom(32)),
        "auth for another folder": request(auth=caller_mac(key, "/x/1/adapter", f"{now:.3f}")),
        "a deadline a day ahead": request(deadline=f"{now + 86400:.3f}"),
        "not a number": request(deadline="soon"),
        "through a symlink": request(adapter=str(link / "1" / "adapter")),
        "a folder that does not exist": request(adapter="/nowhere/1/adapter"),
        "a model folder with code of its own": request(adapter=str(copy / "1" / "adapter")),
        "the model folder, not its adapter": request(adapter=str(served_folder)),
    }
    for what, inputs in refusals.items():
        with pytest.raises(RequestError) as err:
            callers.check(inputs)
        assert CLIENT_FAULT_PREFIX + str(err.value) == CALLER_REFUSED, what
        assert err.value.client_fault, what
    with pytest.raises(RequestError):
        other_base.check(request())  # alice's adapter is of another base than this one's
    # a file of the folder changed after it was checked: checked again, and refused
    (served_folder / "1" / "model.py").write_text("import os\n")
    with pytest.raises(RequestError):
        callers.check(request())


def test_the_shared_base_answers_loading_until_its_pipeline_is_up_and_retries_a_failed_load():
    import threading as _threading

    from avatarforge.serving import bootstrap
    from avatarforge.serving.shared_base import LoadingSharedBase, error_message

    release, attempts = _threading.Event(), []
    now = [0.0]

    class Model:
        def handle(self, requests):
            return ["image"] * len(requests)

    def load():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("/opt/ml/secret: no base")
        release.wait(10)
        return Model()

    loading = LoadingSharedBase(load, clock=lambda: now[0])
    assert loading.wait(5) is None and loading.error is not None
    (failed,) = loading.handle([{}])
    assert error_message(failed).startswith("internal error (reference ")  # no path, no detail
    now[0] += bootstrap.RESTART_AFTER_S  # a failed load is tried again after a while
    answers = loading.handle([{}, {}])
    assert all(error_message(a).startswith(bootstrap.BASE_LOADING) for a in answers)
    assert "retry" in error_message(answers[0])
    release.set()
    assert loading.wait(10) is not None and len(attempts) == 2
    assert loading.handle([{}]) == ["image"]


def test_answers_are_counted_per_user_in_cloudwatch_embedded_metric_format():
    import io

    from avatarforge.serving.bootstrap import OUTCOMES, RequestCounters

    out, now = io.StringIO(), [1000.0]
    emit = lambda line: out.write(line + "\n")  # noqa: E731
    counters = RequestCounters(None, log_every_s=60, emit=emit, clock=lambda: now[0])
    for user, outcome in [("alice", "served"), ("alice", "served"), ("bob", "refused")]:
        counters.add(user, outcome)
    assert out.getvalue() == ""  # once a minute, not per request
    now[0] += 60
    counters.add("alice", "timed_out")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["user"] for line in lines] == ["alice", "bob"]
    alice = lines[0]
    assert (alice["served"], alice["timed_out"], alice["refused"]) == (2, 1, 0)
    (directive,) = alice["_aws"]["CloudWatchMetrics"]
    assert directive["Dimensions"] == [["user"]] and directive["Namespace"] == "avatarforge"
    assert [m["Name"] for m in directive["Metrics"]] == list(OUTCOMES)
    assert alice["_aws"]["Timestamp"] == 1060000
    counters.flush()
    assert len(out.getvalue().splitlines()) == 2  # nothing new since: no line


def test_a_shared_base_that_cannot_start_is_tried_again_only_after_a_while(tmp_path):
    from avatarforge.serving import bootstrap

    logged = []
    instance = Instance({"AVATARFORGE_ENV_SOURCE": str(tmp_path / "nowhere.tar.gz"),
                         "AVATARFORGE_SHARED_DIR": str(tmp_path)})  # fmt: skip
    starter = bootstrap.BaseStarter({"name": "sd_base_x"}, instance, _Core(False), logged.append)
    starter.start()
    deadline = time.monotonic() + 10
    while starter.state == "starting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert starter.state == "failed" and "does not exist" in starter.error
    assert "does not exist" in logged[0]  # the reason, with its path, goes to the log
    starter.start()
    assert starter.state == "failed"  # not at once: every request would start it again
    starter.since -= bootstrap.RESTART_AFTER_S
    starter.start()
    assert starter.state in ("starting", "failed") and len(logged) <= 2


def test_a_user_model_loaded_beside_a_running_base_asks_triton_only_while_it_loads(tmp_path):
    from avatarforge.serving import bootstrap

    class Counting(_Core):
        asked = 0

        def is_model_ready(self, name):
            self.asked += 1
            return super().is_model_ready(name)

    instance = Instance({"AVATARFORGE_SHARED_DIR": str(tmp_path)})
    template = {"name": "sd_base_x", "parameters": {"BASE_HASH": {"string_value": "ab"}}}
    up = Counting(True)
    starter = bootstrap.BaseStarter(template, instance, up)
    starter.start_at_load()
    # ready when initialize() returns, and no thread left to look the base up after it: Triton
    # replaces its model map at each load and unload, and its lookups read it without a lock
    assert starter.state == "ready" and starter.base.name == "sd_base_x" and up.asked == 1
    time.sleep(0.2)
    assert up.asked == 1
    down = Counting(False)
    starter = bootstrap.BaseStarter(template, instance, down)
    starter.start_at_load()  # not up: started in a thread, which goes on to load it
    deadline = time.monotonic() + 10
    while starter.state == "starting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert starter.state == "failed" and "load_model" in starter.error  # the stand-in has none


# ---------------------------------------------------------------- defaults and time


def test_an_instance_fills_in_the_size_and_steps_a_request_leaves_out():
    # the tiny base on a CPU: 256 px, 12 steps (512 px and 30 steps took over 60 s on a busy
    # 2-core CPU); what a request sends is kept; an instance may set its own
    tiny = ServingConfig().gen_defaults(tiny_on_cpu=True)
    assert (tiny.height, tiny.width, tiny.steps) == (256, 256, 12)
    assert ServingConfig().gen_defaults(tiny_on_cpu=False) == GenArgs()  # GPU: 512 px, 30
    parsed = parse_request(
        _req(prompt=["a", "b"], gen_args=['{"seed": 3}', '{"height": 512, "steps": 2}']),
        defaults=tiny,
    )
    assert parsed.rows[0].args == GenArgs(steps=12, height=256, width=256, seed=3)
    assert parsed.rows[1].args == GenArgs(steps=2, height=512, width=256)
    assert parse_request(_req(prompt=["a"]), defaults=tiny).rows[0].args == tiny
    set_here = ServingConfig.from_env(
        {"AVATARFORGE_SERVING_DEFAULT_STEPS": "20", "AVATARFORGE_SERVING_DEFAULT_SIZE": "384"}
    ).gen_defaults(tiny_on_cpu=True)
    assert (set_here.height, set_here.width, set_here.steps) == (384, 384, 20)
    with pytest.raises(ConfigError, match="AVATARFORGE_SERVING_DEFAULT_SIZE"):
        ServingConfig.from_env({"AVATARFORGE_SERVING_DEFAULT_SIZE": "100"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pace_counts_the_fastest_step_of_a_shape_two_calls_measured():
    from avatarforge.serving.pace import PACE_MEMORY_S, Pace, StepShape

    clock = Clock()
    pace = Pace(clock)
    small, large = StepShape(256 * 256, 2), StepShape(512 * 512, 2)
    pace.record(small, 0.5)
    assert pace.step_s(small) is None  # one call proves nothing
    pace.record(small, 0.2)
    assert pace.step_s(small) == 0.2  # the fastest, not the latest
    assert pace.step_s(large) == 0.2  # a larger step takes at least as long
    assert pace.step_s(StepShape(128 * 128, 2)) is None  # a smaller one: not known
    assert pace.step_s(StepShape(256 * 256, 1)) is None
    assert pace.least_seconds([(large, 30), (small, 10)]) == pytest.approx(8.0)
    pace.record(large, 1.0)
    pace.record(large, 1.5)
    assert pace.step_s(large) == 1.0  # the slowest of the shapes' fastest steps within it
    clock.now += PACE_MEMORY_S + 1
    assert pace.step_s(large) is None  # forgotten


def test_a_load_spike_does_not_refuse_what_the_quiet_pace_finishes():
    # measured on this 2-core CPU: a 512 px step of the tiny base 0.10 s quiet, 0.3-1.2 s
    # beside two busy loops. The quiet steps stay remembered: a request that finishes at that
    # pace runs; one that cannot finish even at that pace is refused with what fits
    from avatarforge.serving.handler import TimeBudget
    from avatarforge.serving.pace import PROBE_S, Pace, StepShape

    clock = Clock()
    budget = TimeBudget(60, Pace(clock))
    shape = StepShape(512 * 512, 2)
    for seconds in (0.12, 0.10):  # quiet
        budget.pace.record(shape, seconds)
    clock.now += 30
    for seconds in (1.2, 0.9, 1.1, 1.0):  # a busy minute
        budget.pace.record(shape, seconds)
        clock.now += 10
    budget.refuse_if_too_long([(shape, 150)])  # 15 s at the quiet pace: it may run (not 150 s)
    with pytest.raises(RequestError) as refused:
        budget.refuse_if_too_long([(shape, 150)] * 5)  # 75 s even at the quiet pace
    assert refused.value.client_fault and refused.value.status == 400
    assert "needs at least 75 s" in str(refused.value) and "0.10 s a step" in str(refused.value)
    assert "AVATARFORGE_SERVING_REQUEST_TIMEOUT_S" in str(refused.value)
    slow = TimeBudget(10, budget.pace)  # an instance with 10 s: 100 steps fit
    with pytest.raises(RequestError, match="at most 100 steps at this size"):
        slow.refuse_if_too_long([(shape, 150)])
    # no request of the shape was measured for a minute (they were refused): one runs again
    clock.now += PROBE_S + 1
    slow.refuse_if_too_long([(shape, 150)])


def test_one_slow_call_refuses_nothing():
    from avatarforge.serving.handler import TimeBudget
    from avatarforge.serving.pace import Pace, StepShape

    budget = TimeBudget(60, Pace(Clock()))
    shape = StepShape(512 * 512, 2)
    budget.pace.record(shape, 30.0)  # e.g. a first call that also loaded something
    budget.refuse_if_too_long([(shape, 150)])
    budget.pace.record(shape, 25.0)  # a second call confirms it
    with pytest.raises(RequestError, match="at most 2 steps at this size"):
        budget.refuse_if_too_long([(shape, 150)])


def test_work_that_cannot_end_in_the_time_left_is_skipped_and_too_much_is_refused():
    from PIL import Image

    from avatarforge.serving.handler import TimeBudget, handle_batched
    from avatarforge.serving.pace import Pace, StepShape

    ran = []

    def run(jobs):
        ran.extend(jobs)
        return [[Image.new("RGB", (j.row.args.width, j.row.args.height))] for j in jobs]

    budget = TimeBudget(60, Pace())
    step = StepShape(256 * 256, 2)  # 256 px, one image, guidance on
    budget.pace.record(step, 1.0)
    budget.pace.record(step, 1.5)

    def request(steps, left_s):
        return {
            "prompt": np.array([[b"a photo"]], dtype=object),
            "gen_args": np.array([[json.dumps({"steps": steps}).encode()]], dtype=object),
            "deadline": np.array([[f"{time.time() + left_s:.3f}".encode()]], dtype=object),
        }

    tiny = GenArgs(steps=12, height=256, width=256)
    waited, too_long, fits = handle_batched(
        [request(30, 10), request(90, 60), request(30, 60)], run, lambda a: True,
        defaults=tiny, budget=budget,
    )  # fmt: skip
    assert waited.status == 503 and "skipped: its turn came 50 s after its arrival" in str(waited)
    assert "needs at least 30 s" in str(waited) and str(waited).endswith("; retry")
    assert too_long.status == 400 and "at most 60 steps at this size" in str(too_long)
    assert [job.request for job in ran] == [2] and ran[0].row.args.height == 256
    assert from_jpeg_base64(fits[0][0]).size == (256, 256)  # the instance's defaults
    # the old words: "the server was busy" for a request that was simply too big
    for answer in (waited, too_long):
        assert "the server was busy and the client has stopped waiting" not in str(answer)


@pytest.fixture(scope="module")
def cpu_shared_base(tiny_base):
    from avatarforge.base.pipeline import load_pipeline
    from avatarforge.serving.shared_base import SharedBase

    defaults = ServingConfig().gen_defaults(tiny_on_cpu=True)
    return SharedBase(load_pipeline(tiny_base, device="cpu"), tiny_base, defaults=defaults,
                      request_timeout_s=20)  # fmt: skip


def test_a_run_that_cannot_end_in_time_stops_after_a_few_steps_and_then_is_refused(
    cpu_shared_base,
):
    # 150 steps at 768 px need ~45 s on a quiet 2-core CPU (0.3 s a step), more under load;
    # the instance's clients wait 20 s. Before: every try ran 20 s and was answered "the
    # server was busy"; now a try stops once its pace shows it cannot end, says what fits,
    # and once two tries measured it, the next is refused before any work
    from avatarforge.serving.handler import handle_batched

    shared = cpu_shared_base
    big = json.dumps({"steps": 150, "height": 768, "width": 768})

    def send():
        request = _req(prompt=["a photo"], gen_args=[big], deadline=[f"{time.time() + 20:.3f}"])
        started = time.monotonic()
        (answer,) = handle_batched([request], shared.generate_jobs, lambda a: True,
                                   defaults=shared.defaults, budget=shared.budget)  # fmt: skip
        return answer, time.monotonic() - started

    for steps in (3, 1):  # its own first step and two timed; then the pace of the first try
        answer, took = send()
        assert answer.status == 503, answer
        message = str(answer)
        assert message.startswith("not done within serving.request_timeout_s (20 s)"), message
        assert f"stopped after {steps} of 150 denoising steps" in message
        assert "the rest needs at least" in message and "busy" not in message
        assert (
            "steps at this size" in message and "AVATARFORGE_SERVING_REQUEST_TIMEOUT_S" in message
        )
        assert took < 15, took  # not the whole 20 s
    answer, took = send()
    assert answer.status == 400 and "needs at least" in str(answer), answer
    assert took < 1
    # what fits still runs, at the instance's default size
    (fits,) = handle_batched([_req(prompt=["a photo"], gen_args=['{"steps": 2}'],
                                   deadline=[f"{time.time() + 20:.3f}"])],
                             shared.generate_jobs, lambda a: True, defaults=shared.defaults,
                             budget=shared.budget)  # fmt: skip
    assert from_jpeg_base64(fits[0][0]).size == (256, 256)
