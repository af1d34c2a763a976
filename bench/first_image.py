"""The first image of a fresh instance, from nothing but the base tarball, on this machine.

    python bench/first_image.py [--base full] [--steps 2] [--size 512] [--request-timeout-s 900]

What a fresh SageMaker MME instance does with a user's first request, with the real
tritonserver: the base weights come as a tarball (``deploy mme`` uploads one; here read from
local disk, so no download is in the numbers), the user model loads, its thread starts the
shared base, whose thread extracts and hash-checks the base and loads the pipeline; the client
sends its request again after every 503 until it is answered, then once more (the warm time,
which is the generation alone). The serving env is this .venv (on SageMaker, a tarball Triton
extracts: not measured here). ``--base full``: the full-size SD 2.1 architecture with random
weights (:func:`avatarforge.fullsize.build_full_base`, 2.6 GB fp16; built once, minutes).

Prints the phases and writes build/bench/first_image.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import write_results

PROMPT = "a photo of <<TOK>> person"


def base_tarball(base, out: Path, compresslevel: int) -> Path:
    """The base as deploy ships it: one diffusers folder in a tar.gz (made once, cached)."""
    from avatarforge.safe_tar import write_reproducible_tar

    tarball = out / f"{Path(base.path).name}-{base.content_hash[:12]}.tar.gz"
    if not tarball.is_file():
        name = Path(base.path).name
        write_reproducible_tar(base.path, tarball, name, compresslevel=compresslevel)
    return tarball


def run(a: argparse.Namespace) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    from avatarforge.base.config import BaseConfig, resolve_base
    from avatarforge.fullsize import build_full_base, random_adapter
    from avatarforge.paths import build_dir
    from avatarforge.serving import client
    from avatarforge.serving.config import ServingConfig, local_instance_env
    from avatarforge.serving.package import package_user
    from avatarforge.serving.repository import build_repository
    from avatarforge.tritonserver.launch import tritonserver

    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    if a.base == "full":
        base = build_full_base(device="cpu")
    else:
        base = resolve_base(BaseConfig(base=a.base))
    results["base_build_s"] = round(time.perf_counter() - t0, 1)
    root = build_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tarball = base_tarball(base, root, a.compresslevel)
    results["base_tarball_s"] = round(time.perf_counter() - t0, 1)
    results["base_tarball_mib"] = round(tarball.stat().st_size / 2**20)
    args = {"steps": a.steps, "height": a.size, "width": a.size, "seed": 1}
    with tempfile.TemporaryDirectory(prefix="first-image-", dir=root) as tmp:
        work = Path(tmp)
        adapter = random_adapter(base, work / "adapter", seed=7)
        package = package_user("alice", adapter, work / "pkg", base=base)
        build_repository(work / "repo", [package])
        serving = ServingConfig(request_timeout_s=a.request_timeout_s)
        env = local_instance_env(tarball, work / "shared", serving=serving)
        log = work / "triton.log"
        with tritonserver([work / "repo"], env=env, log_path=log) as server:
            results["server_start_s"] = round(server.started_s, 1)
            t0 = time.perf_counter()
            server.load("alice")
            results["user_model_load_s"] = round(time.perf_counter() - t0, 1)
            answers: list[str] = []
            while True:
                try:
                    client.generate(server.url, "alice", PROMPT, gen_args=args)
                    break
                except client.ServingError as exc:
                    if "unavailable: " not in str(exc):
                        raise
                    answers.append(str(exc).split("unavailable: ", 1)[1][:60])
                    time.sleep(1)
            results["first_image_s"] = round(time.perf_counter() - t0, 1)
            results["answers_503"] = len(answers)
            results["answer_kinds"] = sorted({re.sub(r"\(.*", "", s).strip() for s in answers})
            t1 = time.perf_counter()
            try:
                client.generate(server.url, "alice", PROMPT, gen_args=args)
            except InferenceServerException as exc:
                raise RuntimeError(f"the warm request failed: {exc}") from exc
            results["warm_image_s"] = round(time.perf_counter() - t1, 1)
        text = log.read_text(errors="replace")
        for key, pattern in (
            ("base_present_s", r"present and verified in ([\d.]+) s"),
            ("pipeline_load_s", r"pipeline loaded on \S+ in ([\d.]+) s"),
        ):
            found = re.findall(pattern, text)
            results[key] = float(found[-1]) if found else None
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="full", help="'full' (full-size SD 2.1), 'tiny', or a path")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the image")
    p.add_argument("--size", type=int, default=512, help="image side, px")
    p.add_argument("--request-timeout-s", type=int, default=900, help="the instance's timeout")
    p.add_argument("--compresslevel", type=int, default=1, help="gzip level of the base tarball")
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    results = run(a)
    for key, value in results.items():
        print(f"{key:>20}: {value}")
    write_results("first_image", vars(a), results)


if __name__ == "__main__":
    main()
