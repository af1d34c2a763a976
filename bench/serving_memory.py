"""Memory per resident user model on the real local MME, with the bare-stub floor beside it.

    python bench/serving_memory.py [--users 1,10,50] [--floor 3] [--no-invoke]

Starts tritonserver with the SageMaker front end
(avatarforge.tritonserver.sagemaker.sagemaker_triton) and
loads TargetModels through avatarforge.mme.loader.MultiModelLoader, as SageMaker does:

- the floor: ``--floor`` bare python-backend models (numpy + pb_utils only, no
  EXECUTION_ENV_PATH, so they run under the same bare Python as user models);
- users: packaged with avatarforge.serving.package.package_user, each with its own adapter
  (seeded random weights at the default rank: they really differ), loaded up to 1, 10, 50.

At each point it reads, for every python backend stub of the server, Private_Dirty (pages no
other process shares: what one more resident model costs the instance), and tritonserver's own
RSS. Each new user is invoked once (a 64 px, 1-step image through the shared base) unless
--no-invoke, and measured again: a resident user has served a request. Prints ratios to the
floor and writes build/bench/serving_memory.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _results import write_results

PROMPT = "a photo of <<TOK>> person"
SMALL = {"steps": 1, "height": 64, "width": 64, "seed": 0}

FLOOR_MODEL_PY = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", x * 2)]))
        return responses
"""
FLOOR_CONFIG = """\
backend: "python"
max_batch_size: 0
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
FLOOR_REQUEST = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def write_floor_archive(source: Path, name: str) -> str:
    """A bare python model as a TargetModel archive (no EXECUTION_ENV_PATH: the bare Python)."""
    from avatarforge.safe_tar import write_reproducible_tar
    from avatarforge.serving.package_check import write_checksum

    model = source / "src" / name
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(FLOOR_CONFIG)
    (model / "1" / "model.py").write_text(FLOOR_MODEL_PY)
    write_checksum(write_reproducible_tar(model, source / f"{name}.tar.gz", name))
    return f"{name}.tar.gz"


def users_and_floors(model_dir: Path, name: str) -> None:
    """The loader's check: our packages as always; a floor is a bare model of its own."""
    from avatarforge.serving.package_check import check_package

    if not name.startswith("floor-"):
        check_package(model_dir, name)


def package_users(base, source: Path, work: Path, count: int) -> list[str]:
    """``count`` users, each with its own adapter (another seed), as <user>.tar.gz in source."""
    from avatarforge.adapter import read_adapter
    from avatarforge.fullsize import random_adapter
    from avatarforge.serving.package import package_user
    from avatarforge.train import TrainConfig

    d = TrainConfig()
    targets, hashes = [], set()
    for i in range(count):
        user = f"user-{i:03d}"
        adapter = random_adapter(
            base,
            work / "adapters" / user,
            seed=1000 + i,
            unet_rank=d.unet_rank,
            unet_alpha=d.unet_alpha,
            text_encoder_rank=d.text_encoder_rank,
            text_encoder_alpha=d.text_encoder_alpha,
        )
        hashes.add(read_adapter(adapter).weights_sha256)
        package_user(user, adapter, source, base=base)
        targets.append(f"{user}.tar.gz")
    if len(hashes) != count:
        raise RuntimeError(f"{count} users but only {len(hashes)} distinct adapters")
    return targets


def snapshot(server_pid: int, kinds: dict[str, str]) -> dict[str, Any]:
    """Private_Dirty of every stub by kind (user, floor, shared base), tritonserver's memory."""
    import psutil

    from avatarforge.serving.processes import private_dirty_bytes, stub_processes

    by_kind: dict[str, list[int]] = {"user": [], "floor": [], "shared base": [], "other": []}
    torch_users = 0
    for stub in stub_processes(server_pid):
        kind = kinds.get(stub.instance.rsplit("_", 2)[0], "other")
        by_kind[kind].append(stub.private_dirty_bytes())
        if kind == "user" and stub.maps_library("libtorch"):
            torch_users += 1
    return {
        "private_dirty": by_kind,
        "users_mapping_libtorch": torch_users,
        "server_rss": psutil.Process(server_pid).memory_info().rss,
        "server_private_dirty": private_dirty_bytes(server_pid),
    }


def summarize(point: dict[str, Any], before: dict[str, Any], added: int) -> dict[str, Any]:
    """Per-model figures of one snapshot; server growth per model since ``before``."""
    pd = point["private_dirty"]

    def stats(values: list[int]) -> dict[str, float]:
        if not values:
            return {}
        return {
            "median_mib": mib(statistics.median(values)),
            "mean_mib": mib(statistics.mean(values)),
            "max_mib": mib(max(values)),
            "total_mib": mib(sum(values)),
            "count": len(values),
        }

    return {
        "user": stats(pd["user"]),
        "floor": stats(pd["floor"]),
        "shared_base_mib": mib(sum(pd["shared base"])),
        "server_rss_mib": mib(point["server_rss"]),
        "server_rss_growth_per_model_mib": mib(
            (point["server_rss"] - before["server_rss"]) / max(added, 1)
        ),
        "server_private_dirty_growth_per_model_mib": mib(
            (point["server_private_dirty"] - before["server_private_dirty"]) / max(added, 1)
        ),
        "users_mapping_libtorch": point["users_mapping_libtorch"],
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    from avatarforge.base.config import BaseConfig, resolve_base
    from avatarforge.mme import MMEConfig, MultiModelLoader, model_hash
    from avatarforge.mme.generate import generate_request
    from avatarforge.paths import build_dir
    from avatarforge.serving.config import local_instance_env
    from avatarforge.serving.triton_config import sd_base_name
    from avatarforge.tritonserver.sagemaker import sagemaker_triton

    started = time.perf_counter()
    points = sorted(set(a.users))
    base = resolve_base(BaseConfig(base=a.base))
    root = build_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"base": base.base_id, "points": {}}
    with tempfile.TemporaryDirectory(prefix="serving-memory-", dir=root) as tmp:
        work = Path(tmp)
        source = work / "source"
        source.mkdir()
        t0 = time.perf_counter()
        users = package_users(base, source, work, points[-1])
        floors = [write_floor_archive(source, f"floor-{i}") for i in range(a.floor)]
        results["package_s"] = round(time.perf_counter() - t0, 1)
        # stubs are named <model>_<group>_<index>; Triton's SageMaker front end names a model
        # by its TargetModel (by the hash where another version names it so)
        kinds = {name: "user" for t in users for name in (t, model_hash(t))}
        kinds |= {name: "floor" for t in floors for name in (t, model_hash(t))}
        kinds[sd_base_name(base.content_hash)] = "shared base"

        env = local_instance_env(base.path, work / "shared")
        with sagemaker_triton(work / "triton", extra_env=env, start_timeout=120) as server:
            config = MMEConfig(max_loaded=points[-1] + a.floor + 1)  # default 8 would evict
            loader = MultiModelLoader(
                server.sagemaker_url,
                str(source),
                work / "models",
                config,
                check_model=users_and_floors,
            )
            start = snapshot(server.pid, kinds)
            t0 = time.perf_counter()
            for target in floors:
                loader.invoke(target, FLOOR_REQUEST)
            floor_s = time.perf_counter() - t0
            after_floor = snapshot(server.pid, kinds)
            results["floor"] = summarize(after_floor, start, a.floor) | {
                "load_and_invoke_s_per_model": round(floor_s / max(a.floor, 1), 2)
            }
            print(f"floor: {a.floor} bare models loaded ({floor_s:.1f} s)", flush=True)
            loaded = 0
            before = {"after_load": after_floor, "after_request": after_floor}
            request = generate_request(PROMPT, gen_args=SMALL)
            for n in points:
                new = users[loaded:n]
                t0 = time.perf_counter()
                for target in new:
                    loader.load(target)
                load_s = time.perf_counter() - t0
                now = {"after_load": snapshot(server.pid, kinds)}
                point: dict[str, Any] = {"load_s_per_user": round(load_s / len(new), 2)}
                if a.invoke:
                    t0 = time.perf_counter()
                    # in parallel, as users' requests arrive: the shared base batches them
                    with ThreadPoolExecutor(a.parallel) as pool:
                        list(pool.map(lambda t: loader.invoke(t, request), new))
                    point["invoke_s_per_user"] = round((time.perf_counter() - t0) / len(new), 2)
                    now["after_request"] = snapshot(server.pid, kinds)
                for state, snap in now.items():  # growth since the same state one point before
                    point[state] = summarize(snap, before[state], len(new))
                results["points"][str(n)] = point
                print(f"{n} users loaded ({load_s:.1f} s for {len(new)})", flush=True)
                loaded = n
                before |= now
            results["server_start_s"] = round(server.start_seconds, 1)
    results["total_s"] = round(time.perf_counter() - started, 1)
    return results


def print_table(results: dict[str, Any]) -> None:
    floor = results["floor"]["floor"]
    print(
        f"\nPrivate_Dirty per resident model (median); floor: a bare python-backend model, "
        f"{floor['median_mib']} MiB ({floor['count']} loaded and invoked)"
    )
    head = ("users", "loaded", "/ floor", "served 1", "/ floor", "max", "base", "triton +/user",
            "load s")  # fmt: skip
    print("{:>6} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>13} {:>7}".format(*head))
    for n, point in results["points"].items():
        loaded = point["after_load"]
        served = point.get("after_request", {}).get("user", {}).get("median_mib", float("nan"))
        user = loaded["user"]["median_mib"]
        last = point.get("after_request", loaded)
        print(
            f"{n:>6} {user:8.1f} {user / floor['median_mib']:7.2f} {served:8.1f} "
            f"{served / floor['median_mib']:7.2f} {last['user']['max_mib']:7.1f} "
            f"{last['shared_base_mib']:7.1f} {loaded['server_rss_growth_per_model_mib']:13.1f} "
            f"{point['load_s_per_user']:7.2f}"
        )
    print(
        "MiB. loaded: after loading; served 1: after one request each; base: the shared base's "
        "stub; triton +/user: tritonserver's own RSS growth per user added since the previous "
        "row (the first row includes starting the shared base)"
    )
    print(f"total {results['total_s']} s (packaging {results['package_s']} s)")


def parse_users(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--users: comma list of counts (got {text!r})") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--users: counts must be >= 1 (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=parse_users, default=[1, 10, 50], help="e.g. 1,10,50")
    p.add_argument("--floor", type=int, default=3, help="bare models loaded as the floor")
    p.add_argument("--base", default="tiny", help="the shared base (users do not hold it)")
    p.add_argument(
        "--no-invoke", dest="invoke", action="store_false", help="measure after load only"
    )
    p.add_argument("--parallel", type=int, default=8, help="requests in flight at once")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error("--parallel: must be >= 1")
    if a.floor < 1:
        p.error("--floor: must be >= 1 (the floor is what the figures are compared with)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    results = run(a)
    print_table(results)
    write_results("serving_memory", vars(a), results)


if __name__ == "__main__":
    main()
