"""A bounded load test of the local MME on loopback: errors, latency, memory over load cycles.

    python bench/reliability.py [--users 30] [--clients 20] [--requests 5] [--max-loaded 8]
                                [--cycles 100]

Packages ``--users`` users, each with its own adapter (seeded random LoRA weights at the default
rank), starts the local MME as `avatarforge mme serve` does (tritonserver's SageMaker front end,
the TargetModel loader with ``--max-loaded`` below the user count so that loads and evictions
happen, our front on a loopback port), then:

1. load: ``--clients`` threads each send ``--requests`` generate requests (64 px, 2 steps) to
   users drawn by a seeded random generator, through the front over HTTP as a client would;
   every answer that is not an image of the asked user's size is an error (target: 0).
2. memory: tritonserver's resident memory (VmRSS) before and after ``--cycles`` load/unload
   cycles of the users in turn (target: growth under 5%).

Clients retry as ours do (503 and 429, with backoff: :func:`avatarforge.mme.front.
invoke_endpoint`); the retries are counted by kind, and an answer that is still an error after
them counts as an error, by kind ("HTTP 400 ModelError", "OSError", ...). When any request
failed, tritonserver's log and the loader's are kept under build/bench/reliability-logs/<time>/.

Prints the table docs/reliability.md shows and writes build/bench/reliability.json.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _results import write_results

PROMPT = "a photo of <<TOK>> person"
SMALL = {"steps": 2, "height": 64, "width": 64}
MAX_ERRORS = 0
MAX_GROWTH = 0.05


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def error_kind(exc: BaseException) -> str:
    """What kind of failure: "HTTP <status> <SageMaker code>" for an error answer, else the
    exception's type (a refused or reset connection, an unreadable answer)."""
    status, code = getattr(exc, "status", None), getattr(exc, "code", "")
    if isinstance(status, int):
        return f"HTTP {status} {code}".strip()
    return type(exc).__name__


def load_test(url: str, users: list[str], a: argparse.Namespace) -> dict[str, Any]:
    from avatarforge.mme.front import EndpointError, invoke_endpoint
    from avatarforge.mme.generate import generate_request, images_from_response

    rng = random.Random(a.seed)
    plan = [[rng.choice(users) for _ in range(a.requests)] for _ in range(a.clients)]
    latencies: list[float] = []
    errors: list[str] = []
    kinds: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    lock = threading.Lock()

    def retried(reason: str, _seconds: float) -> None:
        with lock:  # "alice.tar.gz: HTTP 503: unavailable: ..." -> "HTTP 503"
            retries[" ".join(reason.split(": ", 2)[1:2]) or reason] += 1

    def client(index: int) -> None:
        for i, target in enumerate(plan[index]):
            request = generate_request(PROMPT, gen_args={**SMALL, "seed": index * 1000 + i})
            started = time.perf_counter()
            kind = ""
            try:
                response = invoke_endpoint(
                    url, target, request, timeout=a.timeout, retry_s=a.timeout, on_retry=retried
                )
                sizes = [image.size for image in images_from_response(response)]
                ok = sizes == [(SMALL["width"], SMALL["height"])]
                problem = "" if ok else f"{target}: images of sizes {sizes}"
                kind = "" if ok else "wrong images"
            except (EndpointError, OSError, ValueError, KeyError, TypeError) as exc:
                problem = f"{target}: {type(exc).__name__}: {exc}"
                kind = error_kind(exc)
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                if problem:
                    errors.append(problem)
                    kinds[kind] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(client, range(a.clients)))
    wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_kinds": dict(kinds.most_common()),
        "error_examples": errors[:5],
        "retries": dict(retries.most_common()),
        "p50_s": round(percentile(latencies, 0.50), 2),
        "p95_s": round(percentile(latencies, 0.95), 2),
        "max_s": round(max(latencies), 2),
        "mean_s": round(statistics.fmean(latencies), 2),
        "wall_s": round(wall, 1),
        "distinct_users": len({t for p in plan for t in p}),
    }


def keep_logs(logs: list[Path], dest_root: Path) -> Path:
    """Copy ``logs`` (those that exist) into a new folder under ``dest_root``; its path."""
    dest = dest_root / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest.mkdir(parents=True, exist_ok=True)
    for log in logs:
        if log.is_file():
            shutil.copy2(log, dest / log.name)
    return dest


def memory_cycles(loader, server_pid: int, users: list[str], cycles: int) -> dict[str, Any]:
    loader.unload_all()  # the same state before and after: only the shared base's model stays
    before = rss_bytes(server_pid)
    started = time.perf_counter()
    for i in range(cycles):
        target = users[i % len(users)]
        loader.load(target)
        loader.unload(target)
    after = rss_bytes(server_pid)
    return {
        "cycles": cycles,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "growth": round(after / before - 1, 4),
        "s_per_cycle": round((time.perf_counter() - started) / max(cycles, 1), 2),
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    from serving_memory import package_users

    from avatarforge.base.config import BaseConfig, resolve_base
    from avatarforge.mme import MMEConfig, MultiModelLoader
    from avatarforge.mme.front import mme_front
    from avatarforge.mme.generate import generate_request
    from avatarforge.paths import build_dir
    from avatarforge.serving.config import local_instance_env
    from avatarforge.tritonserver.sagemaker import sagemaker_triton

    started = time.perf_counter()
    base = resolve_base(BaseConfig(base=a.base))
    root = build_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"base": base.base_id}
    with tempfile.TemporaryDirectory(prefix="reliability-", dir=root) as tmp:
        work = Path(tmp)
        source = work / "source"
        source.mkdir()
        # the loader's log (loads, evictions, restarts, errors with their references)
        loader_log = logging.FileHandler(work / "loader.log")
        loader_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        avatarforge_log = logging.getLogger("avatarforge")
        avatarforge_log.addHandler(loader_log)
        avatarforge_log.setLevel(logging.INFO)
        t0 = time.perf_counter()
        users = package_users(base, source, work, a.users)
        results["package_s"] = round(time.perf_counter() - t0, 1)
        env = local_instance_env(base.path, work / "shared")
        triton_log = work / "triton" / "tritonserver.log"
        finished = False
        try:
            with sagemaker_triton(work / "triton", extra_env=env, start_timeout=120) as server:
                triton_log = server.log_path
                config = MMEConfig(max_loaded=a.max_loaded, invoke_timeout_s=a.timeout)
                loader = MultiModelLoader(
                    server.sagemaker_url, str(source), work / "models", config
                )
                try:
                    with mme_front(loader) as url:
                        t0 = time.perf_counter()  # the first request starts the shared base
                        loader.invoke(users[0], generate_request(PROMPT, gen_args=SMALL))
                        results["first_request_s"] = round(time.perf_counter() - t0, 1)
                        print(f"shared base up in {results['first_request_s']} s", flush=True)
                        loads, evictions = loader.loads, loader.evictions
                        results["load"] = load_test(url, users, a)
                        results["load"]["loads"] = loader.loads - loads
                        results["load"]["evictions"] = loader.evictions - evictions
                        print(f"load test: {results['load']}", flush=True)
                    results["memory"] = memory_cycles(loader, server.pid, users, a.cycles)
                    print(f"memory: {results['memory']}", flush=True)
                finally:
                    loader.unload_all()
            finished = True
        finally:
            avatarforge_log.removeHandler(loader_log)
            loader_log.close()
            # a request failed, or the run itself (tritonserver died): keep what the servers said
            if not finished or results.get("load", {}).get("errors", 1):
                dest = keep_logs([triton_log, work / "loader.log"], root / "reliability-logs")
                results["logs"] = str(dest)
                print(f"requests failed: logs kept in {dest}", flush=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    results["held"] = {
        "errors": results["load"]["errors"] <= MAX_ERRORS,
        "memory": results["memory"]["growth"] < MAX_GROWTH,
    }
    return results


def print_table(results: dict[str, Any], a: argparse.Namespace) -> None:
    load, memory = results["load"], results["memory"]
    print("\n| what was tried | how many | what held |")
    print("|---|---|---|")
    kinds = ", ".join(f"{n} {kind}" for kind, n in load["error_kinds"].items())
    retries = ", ".join(f"{n} {kind}" for kind, n in load["retries"].items()) or "none"
    print(
        f"| {a.clients} concurrent clients, {a.users} users, max_loaded {a.max_loaded} "
        f"({load['loads']} loads, {load['evictions']} evictions) | {load['requests']} requests | "
        f"{load['errors']} errors (target 0){f': {kinds}' if kinds else ''}; retries: "
        f"{retries}; p50 {load['p50_s']} s, p95 {load['p95_s']} s |"
    )
    print(
        f"| load + unload cycles | {memory['cycles']} | tritonserver RSS "
        f"{memory['rss_before_mib']} -> {memory['rss_after_mib']} MiB "
        f"({memory['growth'] * 100:+.1f}%, target < {MAX_GROWTH * 100:.0f}%) |"
    )
    verdict = "held" if all(results["held"].values()) else "FAILED"
    print(f"\n{verdict}; total {results['total_s']} s (packaging {results['package_s']} s)")
    if "logs" in results:
        print(f"tritonserver's and the loader's logs: {results['logs']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=30, help="users packaged (default 30)")
    p.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    p.add_argument("--requests", type=int, default=5, help="requests per client (default 5)")
    p.add_argument("--max-loaded", type=int, default=8, help="models kept loaded (default 8)")
    p.add_argument("--cycles", type=int, default=100, help="load/unload cycles (default 100)")
    p.add_argument("--timeout", type=float, default=600.0, help="client and invoke timeout, s")
    p.add_argument("--seed", type=int, default=0, help="seed of the users each client asks for")
    p.add_argument("--base", default="tiny", help="the shared base")
    a = p.parse_args(argv)
    for name in ("users", "clients", "requests", "max_loaded", "cycles"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if a.max_loaded >= a.users:
        p.error("--max-loaded: must be below --users, so that loads and evictions happen")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    results = run(a)
    print_table(results, a)
    write_results("reliability", vars(a), results)
    if not all(results["held"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
