"""The MME model's environment through the Triton image's real `serve` script: what tritonserver
is started with (its /ping mode and log verbosity), with a stand-in tritonserver that records it.

tritonserver's SageMaker front end reads SAGEMAKER_TRITON_PING_MODE from its environment, "ready"
when unset (src/sagemaker_server.h); the script only assigns the variable. See
avatarforge.tritonserver.sagemaker.MME_ENV for why "live" and no verbose logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from avatarforge.deploy import base_asset, env_asset, plan_mme
from avatarforge.deploy.assets import MMEAssets

SERVE = Path(__file__).resolve().parent / "sagemaker_serve" / "serve"

# Writes what it was started with, as JSON, where RECORD says.
STAND_IN = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["RECORD"], "w") as out:
    json.dump({"args": sys.argv[1:], "env": dict(os.environ)}, out)
"""


def model_environment(deploy_config) -> dict[str, str]:
    assets = MMEAssets(
        base_asset(deploy_config.base), env_asset(deploy_config.env_tarball, "25.09-py3")
    )
    plan = plan_mme(deploy_config, assets)
    (model,) = [r for r in plan.resources if r.kind == "sagemaker_model"]
    return model.attrs["PrimaryContainer"]["Environment"]


def run_serve(tmp_path: Path, environment: dict[str, str]) -> dict:
    """The serve script as SageMaker starts an MME container: the model's Environment plus
    what the platform adds (SAGEMAKER_MULTI_MODEL for Mode=MultiModel, its port)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tritonserver").write_text(STAND_IN)
    (bin_dir / "tritonserver").chmod(0o755)
    record = tmp_path / "started.json"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "RECORD": str(record),
        "SAGEMAKER_MULTI_MODEL": "true",
        "SAGEMAKER_BIND_TO_PORT": "8080",
        **environment,
    }
    done = subprocess.run(["bash", str(SERVE)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Using Triton ping mode: "live"' in done.stdout  # what the script believes
    return json.loads(record.read_text())


def test_tritonserver_gets_live_ping_and_no_verbose_logs_from_the_model_environment(
    deploy_config, tmp_path: Path
) -> None:
    environment = model_environment(deploy_config)
    started = run_serve(tmp_path, environment)
    # what tritonserver reads: "live" answers /ping while the server runs, whatever a python
    # stub (the shared base's) does; unset, it would be "ready"
    assert started["env"].get("SAGEMAKER_TRITON_PING_MODE") == "live"
    assert "--log-verbose=0" in started["args"]
    assert "--allow-sagemaker=true" in started["args"]
    assert "--model-repository=/tmp/sagemaker" in started["args"]  # MME mode
    # the user models' bootstrap settings reach the server's environment unchanged
    for key in ("AVATARFORGE_SHARED_DIR", "AVATARFORGE_BASE_SOURCE", "AWS_DEFAULT_REGION"):
        assert started["env"][key] == environment[key]


@pytest.mark.parametrize("ping_override", ["", "live"])
def test_the_serve_script_alone_leaves_tritonserver_on_ready(
    tmp_path: Path, ping_override: str
) -> None:
    """Why deploy sets the variable itself: the script's own "live" (and its override knob)
    never reach tritonserver's environment."""
    env = {"SAGEMAKER_TRITON_OVERRIDE_PING_MODE": ping_override} if ping_override else {}
    started = run_serve(tmp_path, env)
    assert "SAGEMAKER_TRITON_PING_MODE" not in started["env"]  # -> tritonserver's "ready"
    assert "--log-verbose=true" in started["args"]  # the script's default
    assert os.environ.get("SAGEMAKER_TRITON_PING_MODE") is None  # not from this test's process


def _status(url: str, body: dict | None = None) -> int:
    request = urllib.request.Request(
        url,
        json.dumps(body).encode() if body is not None else None,
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_with_the_default_ready_one_users_failed_load_fails_the_instances_ping(
    deploy_config, mme_source: Path, tmp_path: Path
) -> None:
    """The real tritonserver behind its SageMaker front end: under "ready" (what the serve
    script leaves it on) a single user model whose load fails turns /ping to 400 for the whole
    instance; under the model environment's "live" /ping stays 200."""
    from avatarforge.safe_tar import safe_extract
    from avatarforge.tritonserver.sagemaker import sagemaker_triton

    folder = tmp_path / "opt-ml-models" / "broken-hash" / "model"
    safe_extract(mme_source / "broken.tar.gz", folder)  # its initialize() raises
    ours = model_environment(deploy_config)["SAGEMAKER_TRITON_PING_MODE"]
    pings = {}
    # the launcher starts from the model environment's MME_ENV: "ready" is the image's default
    ready = {"SAGEMAKER_TRITON_PING_MODE": "ready", "SAGEMAKER_TRITON_OVERRIDE_PING_MODE": ""}
    for mode, env in (("ready", ready), (ours, {"SAGEMAKER_TRITON_PING_MODE": ours})):
        with sagemaker_triton(tmp_path / f"server-{mode}", extra_env=env) as server:
            assert _status(f"{server.sagemaker_url}/ping") == 200
            load = {"model_name": "broken", "url": str(folder)}
            assert _status(f"{server.sagemaker_url}/models", load) == 400  # the load fails
            pings[mode] = _status(f"{server.sagemaker_url}/ping")
    assert pings == {"ready": 400, "live": 200}
