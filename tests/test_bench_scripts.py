"""The benchmark scripts start, and bench/gpu.py runs end to end in its reduced (tiny, CPU) mode.

Only that they run and record what they measured is checked here: the figures themselves are the
benchmarks' business (bench/, not tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},  # AVATARFORGE_BUILD: the tests' build cache (tiny base built once)
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = _run(f"bench/{script}", "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_gpu_bench_budget_skips_and_says_so(tmp_path):
    out = _run("bench/gpu.py", "--tiny", "--budget-s", "1", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "gpu-tiny.json").read_text())["results"]
    statuses = {k: v["status"] for k, v in report["measurements"].items()}
    assert statuses == dict.fromkeys(statuses, "skipped") and "training" in statuses
    assert all("--budget-s" in v["reason"] for v in report["measurements"].values())
    assert report["environment"]["versions"]["torch"]


def test_gpu_bench_unknown_measurement_is_refused():
    out = _run("bench/gpu.py", "--only", "generation,warp-drive", timeout=120)
    assert out.returncode == 2
    assert "unknown measurement(s) warp-drive" in out.stderr


@pytest.mark.slow
def test_gpu_bench_tiny_end_to_end(tmp_path):
    out = _run(
        "bench/gpu.py", "--tiny", "--only", "generation,adapters,batching,training",
        "--runs", "1", "--switches", "2", "--train-steps", "2", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-tiny.json").read_text())
    m = report["results"]["measurements"]
    assert {k: v["status"] for k, v in m.items()} == dict.fromkeys(
        ("base", "generation", "adapters", "batching", "training"), "ok"
    )
    assert m["base"]["base_id"] == "avatarforge/tiny-sd21@seed0"
    gen = m["generation"]["figures"]
    assert (
        gen["avatarforge generate_images vs plain diffusers pipeline: max pixel diff"]["value"] == 0
    )
    adapters = m["adapters"]["figures"]
    assert adapters["adapter a vs b: max pixel diff"]["value"] > 0
    paths = (
        "today, capacity 1 (unload + load)",
        "today, capacity 2 (set_adapters)",
        "slots, cold from disk (1 slot, no host cache)",
        "slots, from the host cache (1 slot)",
        "slots, resident (8 slots)",
    )
    for path in paths:
        assert adapters[f"{path}: vs fresh pipeline, max pixel diff"]["value"] == 0
        assert adapters[f"{path}: switch, median"]["value"] > 0
    batching = m["batching"]["figures"]
    assert batching["batched vs alone (before JPEG): max pixel diff"]["value"] <= 2
    train = m["training"]
    assert len(train["step_seconds"]) == 2 and train["log"]["optimizer"] == "adamw"
    assert "Traceback" not in out.stderr  # no measurement failed
    assert "training" in out.stdout and "switch, median" in out.stdout  # the summary table


TRITON_MEASUREMENTS = ("triton", "triton_new_user", "triton_alternating", "triton_batching",
                       "triton_repair", "triton_residents")  # fmt: skip


@pytest.mark.slow
@pytest.mark.integration
def test_the_gpu_run_script_unpacks_checks_and_serves_through_its_bundle_on_a_cpu(tmp_path):
    """bench/gpu_run.sh as the GPU machine runs it, here: a bundle for this Python (the local
    stub, this environment's numpy, no pinned packages: this environment is the machine's),
    unpacked and checked, then Triton's measurements (a)-(f) on the tiny base through the
    bundle's server. The same code path as on the GPU; its figures are not judged here."""
    from avatarforge.paths import build_dir

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    built = _run(
        "bench/gpu_bundle.py", "build", "--python", python, "--numpy-from-env", "--no-site",
        "--xz-level", "0", "--out", str(bundle), "--cache", str(build_dir() / "gpu-bundle-cache"),
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"server", "numpy", "wheel", "vocab"}
    assert manifest["python"] == python and manifest["total_bytes"] < 58 * 2**20

    env = {**os.environ, "GPU_BUNDLE": str(bundle), "GPU_WORK": str(tmp_path / "work"),
           "OUT": str(out), "AVATARFORGE_BUILD": str(tmp_path / "build"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # fmt: skip
    run = subprocess.run(
        ["bash", "bench/gpu_run.sh", "--tiny", "--only", ",".join(TRITON_MEASUREMENTS),
         "--runs", "1", "--new-users", "1", "--alternating-users", "2", "--batch-users", "2",
         "--residents", "3", "--load-workers", "3"],
        cwd=BENCH.parent, capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    check = json.loads((out / "gpu-check.json").read_text())
    assert check["ok"], check
    checks = check["checks"]
    assert checks[f"stub {python} links libpython{python}.so.1.0"]["found"]
    bare = checks["a model under the bare Python: numpy < 2, no avatarforge"]
    assert bare["numpy"].startswith("1.") and bare["avatarforge"] is None
    assert bare["prefix"].endswith(f"envs/bare-py{python}")  # the bundle's bare Python
    serve = checks["a model in the serving env: torch, numpy < 2"]
    assert serve["prefix"] == str(tmp_path / "work" / "envs" / "serve")
    assert serve["torch"] and serve["avatarforge"]
    # the bundle's server and wheel, not this environment's
    work = str(tmp_path / "work")
    assert checks["tritonserver starts"]["binary"].startswith(work + "/server/pytriton/")
    assert serve["avatarforge_file"].startswith(work + "/site/avatarforge/")

    report = json.loads((out / "gpu-tiny.json").read_text())["results"]
    assert "gpu_run.sh" not in report["command"] and "--bundle" in report["command"]
    assert report["environment"]["bundle"]["python"] == python
    m = report["measurements"]
    assert {k: m[k]["status"] for k in TRITON_MEASUREMENTS} == dict.fromkeys(
        TRITON_MEASUREMENTS, "ok"
    ), {k: m[k].get("error") or m[k].get("reason") for k in TRITON_MEASUREMENTS}
    assert (
        m["triton"]["figures"]["MME image vs in-process (JPEG both): max pixel diff"]["value"] == 0
    )
    assert m["triton_residents"]["figures"]["resident user models"]["value"] == 3
    assert m["triton_repair"]["figures"]["a new shared base process"]["value"] is True
    log = (out / "gpu-run.log").read_text()
    assert "checks passed" in log and "triton_residents" in log


def test_quality_bench_says_what_it_cannot_do_here(tmp_path):
    env_build = {"AVATARFORGE_BUILD": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "bench/quality.py", "--only", "default,rank-4"],
        cwd=BENCH.parent, capture_output=True, text=True, timeout=120,
        env={**os.environ, **env_build},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "did not run here" in out.stdout and "no --base" in out.stdout
    report = json.loads((tmp_path / "bench" / "quality.json").read_text())["results"]
    assert report["status"] == "skipped"
    assert any("--base" in reason for reason in report["reasons"])
    assert list(report["variants"]) == ["default", "rank-4"]


def test_quality_bench_unknown_variant_is_refused():
    out = _run("bench/quality.py", "--only", "default,rank-3", timeout=120)
    assert out.returncode == 2 and "unknown variant(s) rank-3" in out.stderr


@pytest.mark.slow
def test_quality_bench_tiny_end_to_end(tmp_path):
    out = _run(
        "bench/quality.py", "--tiny", "--only", "default,text-encoder-off",
        "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "these scores measure nothing" in out.stdout
    from avatarforge.paths import build_dir

    report = json.loads((build_dir() / "bench" / "quality.json").read_text())["results"]
    assert report["status"] == "ok" and report["measures_nothing"] is True
    rows = report["variants"]
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert rows["text-encoder-off"]["adapter_bytes"] < rows["default"]["adapter_bytes"]
    assert rows["text-encoder-off"]["train"]["train_text_encoder"] is False
    for row in rows.values():
        assert json.loads(Path(row["report"]).read_text())["measures_nothing"] is True
        assert Path(row["grid"]).is_file()
