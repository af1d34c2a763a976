"""bench/gpu.py's serving measurements: the compiled UNet, and the real tritonserver side by side
with the in-process pipeline.

The in-process reference is the shared base's own code (:class:`SharedBase` on a pipeline of the
base, prepared as ``serving.torch_compile`` says, :func:`prepare_for_serving`), so a ratio
against it is what Triton adds. Through Triton, users are packaged as for SageMaker, loaded
through tritonserver's SageMaker front end (``POST /models``), run under the bare Python (numpy
only), and forward to the one shared base in the serving env; with ``--bundle`` both Pythons
and the server are the bundle's (bench/gpu_bundle.py), else this machine's (the local venv is
the serving env, the launcher's bare env the user models').

  speed               512 px, 50 steps: eager vs compiled UNet (CUDA graphs), both with an
                      adapter in a LoRA slot; compile cost at start with an empty and a filled
                      inductor cache; recompiles and graph breaks while users switch
  triton              (a) a warm image through the MME against in-process, interleaved
  triton_new_user     (b) a new user's first image on a warm instance (load + request)
  triton_alternating  (c) 8 users in turn through the MME against in-process
  triton_batching     (d) 16 users from concurrent clients against one request at a time
  triton_repair       (f) the shared base's process killed: time until images again
  triton_residents    (e) 200 resident user models: private memory per user, GPU memory
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROMPT = "a photo of <<TOK>> person"
TENSORRT_ANCHOR_S = 0.68  # SD 2.1, 512 px, 50 steps, H100 with TensorRT (about 73 it/s)
GOALS = {  # the goals, recorded beside each figure
    "overhead": "<= 1.05",
    "new_user": "<= generation + 0.3 s",
    "alternating": "<= 1.05",
    "batching": ">= 3x",
}


class NotAvailable(Exception):
    """A measurement whose pieces are not on this machine (recorded as such, not a failure)."""


def fig(value: Any, unit: str = "", note: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"value": value, "unit": unit}
    if note:
        out["note"] = note
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def max_pixel_diff(a, b) -> int:
    import numpy as np

    pa = np.asarray(a.convert("RGB"), dtype=np.int16)
    pb = np.asarray(b.convert("RGB"), dtype=np.int16)
    return int(np.abs(pa - pb).max())


def jpeg(image):
    from avatarforge.generate import from_jpeg_base64, to_jpeg_base64

    return from_jpeg_base64(to_jpeg_base64(image))


def compile_counts() -> dict[str, int]:
    """torch.compile's counters so far: graphs compiled (a recompile is one more), graph
    breaks, frames traced."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "frames": int(counters["frames"].get("total", 0)),
    }


def gpu_memory_used_mib() -> float | None:
    """Device-wide used GPU memory (every process), from nvidia-smi; None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        return float(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def gpu_memory_by_pid() -> dict[int, float]:
    """MiB of GPU memory per process (nvidia-smi's compute apps); empty without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.stdout.splitlines():
        with contextlib.suppress(ValueError):
            pid, mib = (s.strip() for s in line.split(","))
            found[int(pid)] = float(mib)
    return found


# ---------------------------------------------------------------- in process


class InProcess:
    """The shared base's code in this process: what a request costs without Triton."""

    def __init__(self, ctx, compile_setting: str) -> None:
        from avatarforge.base.pipeline import INDUCTOR_CACHE, load_pipeline, prepare_for_serving
        from avatarforge.serving.shared_base import SharedBase

        base = ctx.need_base()
        self.device = ctx.device
        cache = ctx.work / "shared" / INDUCTOR_CACHE
        self.cache_files_before = sum(1 for p in cache.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        self.shared = SharedBase(load_pipeline(base, ctx.device), base)
        self.load_s = time.perf_counter() - t0
        self.counts_before = compile_counts()
        self.compile_s = prepare_for_serving(
            self.shared.pipe,
            compile_setting,
            cache,
            before_warm_up=lambda: self.shared.cache.activate(None),
        )  # as SharedBase.from_params does
        self.cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        self.compiled = self.compile_s > 0
        self.counts_after_warm_up = compile_counts()

    def generate(self, adapter: Path | None, args):
        t0 = time.perf_counter()
        (image,) = self.shared.generate(PROMPT, None, args, None if adapter is None else
                                        str(adapter))  # fmt: skip
        sync(self.device)
        return image, time.perf_counter() - t0

    def close(self) -> None:
        self.shared.cache.clear()


def inprocess(ctx) -> InProcess:
    if ctx.extras.get("inprocess") is None:
        ctx.extras["inprocess"] = InProcess(ctx, ctx.opts.compile)
        ctx.closers.append(lambda: ctx.extras.pop("inprocess").close())
    return ctx.extras["inprocess"]


def gen_args(ctx, steps: int | None = None):
    from avatarforge.generate import GenArgs

    o = ctx.opts
    return GenArgs(steps=steps or o.steps, height=o.size, width=o.size, seed=o.seed)


def measure_speed(ctx) -> dict[str, Any]:
    """Eager vs compiled, both serving code with an adapter in a slot, at ``--speed-steps``."""
    from avatarforge.base.pipeline import wants_compile
    from avatarforge.serving.adapter_cache import SlotAdapterCache

    o = ctx.opts
    if not wants_compile(o.compile, ctx.device):
        raise NotAvailable(f"--compile {o.compile}: the UNet is not compiled on {ctx.device}")
    a, b = ctx.adapters(2)
    args = gen_args(ctx, o.speed_steps)
    fast = inprocess(ctx)
    eager_pipe = ctx.pipeline()
    eager = SlotAdapterCache(eager_pipe, ctx.need_base(), slots=2)
    try:

        def eager_run(adapter):
            from avatarforge.generate import generate_images

            eager.activate(str(adapter))
            t0 = time.perf_counter()
            (image,) = generate_images(eager_pipe, PROMPT, None, args)
            sync(ctx.device)
            return image, time.perf_counter() - t0

        fast.generate(a, args)  # warm-up at these steps (the shapes are the warm-up's)
        eager_run(a)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(o.runs):  # interleaved
            times["eager"].append(eager_run(a)[1])
            times["compiled"].append(fast.generate(a, args)[1])
        # users switching: a, b, a through the compiled UNet; each image against eager
        before = compile_counts()
        diffs = {}
        for name, adapter in (("a", a), ("b", b), ("a again", a)):
            image, _ = fast.generate(adapter, args)
            diffs[name] = max_pixel_diff(image, eager_run(adapter)[0])
        after = compile_counts()
    finally:
        eager.clear()
    e, c = median(times["eager"]), median(times["compiled"])
    cold = fast.cache_files_before == 0
    return {
        "workload": f"{o.size}x{o.size}, {o.speed_steps} DDIM steps, guidance 7.5, batch 1, "
        "an adapter in a LoRA slot",
        "seconds": times,
        "compile_counts": {
            "before": fast.counts_before,
            "after warm-up": fast.counts_after_warm_up,
            "before switching": before,
            "after switching": after,
        },
        "inductor_cache": fast.cache_dir,
        "figures": {
            "eager, median": fig(round(e, 4), "s/image"),
            "compiled, median": fig(round(c, 4), "s/image", "torch.compile, CUDA graphs"),
            "compiled steps per second": fig(round(o.speed_steps / c, 2), "it/s"),
            "compiled / eager": fig(round(c / e, 3), "x"),
            f"compiled / TensorRT anchor ({TENSORRT_ANCHOR_S} s at 50 steps, H100)": fig(
                round(c / TENSORRT_ANCHOR_S * 50 / o.speed_steps, 3), "x", "goal <= 1"
            ),
            "compile at start (warm-up)": fig(
                round(fast.compile_s, 2),
                "s",
                "empty inductor cache" if cold else "inductor cache already filled",
            ),
            "recompiles after the start (users a, b, a)": fig(
                after["graphs"] - fast.counts_after_warm_up["graphs"], "", "goal 0"
            ),
            "graph breaks after the start": fig(
                after["graph_breaks"] - fast.counts_after_warm_up["graph_breaks"], "", "goal 0"
            ),
            "graph breaks at the compile": fig(
                fast.counts_after_warm_up["graph_breaks"] - fast.counts_before["graph_breaks"]
            ),
            "compiled vs eager, max pixel diff over a, b, a": fig(
                max(diffs.values()), "/255", "float rounding of fused kernels"
            ),
        },
    }


# ---------------------------------------------------------------- through tritonserver


def triton_unavailable(ctx) -> str:
    """Why tritonserver cannot serve here ("" when it can)."""
    import importlib.util

    bundle = ctx.bundle
    if bundle is not None:
        report = bundle.get("check") or {}
        failed = [k for k, v in report.get("checks", {}).items() if not v["ok"]]
        if not report:
            return "the bundle was not checked (bench/gpu_bundle.py check)"
        needed = [k for k in failed if "CUDA visible" not in k and "wheel matches" not in k]
        if needed:
            return f"bundle checks failed: {', '.join(needed)}"
    elif importlib.util.find_spec("pytriton") is None:
        return "nvidia-pytriton is not installed (and no --bundle)"
    try:
        from avatarforge.tritonserver.install import find_tritonserver

        find_tritonserver()
    except (FileNotFoundError, ImportError) as exc:
        return str(exc)
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not importable (it renders the packages' config.pbtxt)"
    if bundle is None:
        import numpy

        if int(numpy.__version__.split(".")[0]) >= 2:
            return f"numpy {numpy.__version__}: this env serves the shared base; the stub needs < 2"
    return ""


class Rig:
    """One tritonserver with the SageMaker front end, the users packaged for it, a loader."""

    def __init__(self, ctx) -> None:
        if why := triton_unavailable(ctx):
            raise NotAvailable(why)
        from avatarforge.mme import MMEConfig, MultiModelLoader
        from avatarforge.mme.generate import generate_request
        from avatarforge.serving.config import ServingConfig, local_instance_env
        from avatarforge.tritonserver.sagemaker import sagemaker_triton

        self.ctx = ctx
        self.base = ctx.need_base()
        self.source = ctx.work / "mme-source"
        self.source.mkdir(parents=True, exist_ok=True)
        self.serving = ServingConfig(
            device="auto" if ctx.device.startswith("cuda") else "cpu",
            torch_compile=ctx.opts.compile,
            request_timeout_s=3600,
        )
        self.packaged: dict[str, str] = {}
        serve_env = ctx.bundle["serve_env"] if ctx.bundle else None
        env = local_instance_env(self.base.path, ctx.work / "shared", serve_env)
        self.stack = contextlib.ExitStack()
        self.server = self.stack.enter_context(
            sagemaker_triton(ctx.work / "triton", extra_env=env, start_timeout=300)
        )
        config = MMEConfig(max_loaded=10_000, load_timeout_s=1800, invoke_timeout_s=1800)
        self.loader = MultiModelLoader(
            self.server.sagemaker_url, str(self.source), ctx.work / "models", config
        )
        self.request = json.dumps(generate_request(PROMPT, gen_args=gen_args(ctx).to_dict()))
        a, _ = self.package(["bench-a", "bench-b"])
        t0 = time.perf_counter()
        self.invoke(a)  # loads the user and starts the shared base (with its compile)
        self.first_request_s = time.perf_counter() - t0

    def package(self, users: list[str]) -> list[str]:
        """TargetModels of ``users`` (packaged in parallel); adapters cycle over four."""
        from avatarforge.serving.package import package_user

        adapters = self.ctx.adapters(min(4, max(2, len(users))))
        todo = [u for u in users if u not in self.packaged]

        def one(item):
            i, user = item
            package_user(user, adapters[i % len(adapters)], self.source, base=self.base,
                         serving=self.serving)  # fmt: skip

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as pool:
            list(pool.map(one, enumerate(todo, start=len(self.packaged))))
        for user in todo:
            self.packaged[user] = f"{user}.tar.gz"
        return [self.packaged[u] for u in users]

    def invoke(self, target: str):
        from avatarforge.mme.generate import images_from_response

        t0 = time.perf_counter()
        response = self.loader.invoke_raw(target, self.request.encode())
        (image,) = images_from_response(response.json())
        return image, time.perf_counter() - t0

    def shared_base_stub(self):
        from avatarforge.serving.processes import stub_processes
        from avatarforge.serving.triton_config import sd_base_name

        name = sd_base_name(self.base.content_hash)
        found = [s for s in stub_processes(self.server.pid) if s.instance.startswith(name)]
        return found[0] if found else None

    def close(self) -> None:
        self.stack.close()  # stops the server: every model and stub with it


def rig(ctx) -> Rig:
    if ctx.extras.get("rig") is None:
        ctx.extras["rig"] = Rig(ctx)
        ctx.closers.append(lambda: ctx.extras.pop("rig").close())
    return ctx.extras["rig"]


def measure_triton(ctx) -> dict[str, Any]:
    """(a) Triton's overhead: a warm image of one user, through the MME and in process."""
    r = rig(ctx)
    here = inprocess(ctx)
    args = gen_args(ctx)
    a = ctx.adapters(1)[0]
    target = r.packaged["bench-a"]
    image, _ = r.invoke(target)  # warm
    reference, _ = here.generate(a, args)
    warm, local = [], []
    for _ in range(ctx.opts.runs):  # interleaved, so drift hits both alike
        warm.append(r.invoke(target)[1])
        local.append(here.generate(a, args)[1])
    w, loc = median(warm), median(local)
    return {
        "workload": f"{args.width}x{args.height}, {args.steps} DDIM steps, batch 1",
        "compiled": here.compiled,
        "server_start_s": round(r.server.start_seconds, 2),
        "warm_seconds": warm,
        "local_seconds": local,
        "figures": {
            "tritonserver start (SageMaker front end answers /ping)": fig(
                round(r.server.start_seconds, 2), "s"
            ),
            "first user's first image (starts the shared base)": fig(
                round(r.first_request_s, 2),
                "s",
                "includes the shared base's compile" if here.compiled else "",
            ),
            "warm image through the MME, median": fig(round(w, 4), "s"),
            "in-process (the shared base's code), median": fig(round(loc, 4), "s"),
            "MME / in-process": fig(round(w / loc, 3), "x", f"goal {GOALS['overhead']}"),
            "MME image vs in-process (JPEG both): max pixel diff": fig(
                max_pixel_diff(image, jpeg(reference)), "/255"
            ),
        },
    }


def measure_new_user(ctx) -> dict[str, Any]:
    """(b) A user not loaded yet, on a warm instance: fetch + unpack + load + first image."""
    r = rig(ctx)
    here = inprocess(ctx)
    a = ctx.adapters(1)[0]
    local = [here.generate(a, gen_args(ctx))[1] for _ in range(max(1, ctx.opts.runs // 2))]
    targets = r.package([f"bench-new-{i}" for i in range(ctx.opts.new_users)])
    loads, firsts, totals = [], [], []
    for target in targets:
        t0 = time.perf_counter()
        r.loader.load(target)
        t1 = time.perf_counter()
        r.invoke(target)
        totals.append(time.perf_counter() - t0)
        loads.append(t1 - t0)
        firsts.append(totals[-1] - loads[-1])
    gen = median(local)
    total = median(totals)
    return {
        "load_seconds": loads,
        "first_request_seconds": firsts,
        "local_seconds": local,
        "figures": {
            "new user: load (fetch, unpack, check, POST /models), median": fig(
                round(median(loads), 3), "s"
            ),
            "new user: first request after the load, median": fig(round(median(firsts), 3), "s"),
            "new user: load + first image, median": fig(round(total, 3), "s"),
            "in-process generation, median": fig(round(gen, 4), "s"),
            "new user's first image - generation": fig(round(total - gen, 3), "s", "goal <= 0.3 s"),
        },
    }


def measure_alternating(ctx) -> dict[str, Any]:
    """(c) ``--alternating-users`` users in turn through the MME, against in process with the
    same users in turn (each request another user's adapter)."""
    r = rig(ctx)
    here = inprocess(ctx)
    n = ctx.opts.alternating_users
    users = ["bench-a", "bench-b", *(f"bench-alt-{i}" for i in range(n - 2))]
    targets = r.package(users)
    adapters = ctx.adapters(min(4, max(2, n)))
    for target in targets:  # loaded and warm: what is measured is the switching
        r.invoke(target)
    args = gen_args(ctx)
    through, local = [], []
    for _ in range(ctx.opts.alternating_rounds):
        for i, target in enumerate(targets):
            through.append(r.invoke(target)[1])
            if i % 2 == 0:  # half as many in process, spread over the same time
                local.append(here.generate(adapters[i % len(adapters)], args)[1])
    t, loc = median(through), median(local)
    return {
        "users": n,
        "seconds": {"through the MME": through, "in process": local},
        "figures": {
            f"{n} users in turn through the MME, median": fig(round(t, 4), "s"),
            "in process, users in turn, median": fig(round(loc, 4), "s"),
            "MME / in-process": fig(round(t / loc, 3), "x", f"goal {GOALS['alternating']}"),
        },
    }


def measure_batching(ctx) -> dict[str, Any]:
    """(d) ``--batch-users`` users, one client thread each, against one request at a time."""
    r = rig(ctx)
    o = ctx.opts
    users = ["bench-a", "bench-b", *(f"bench-batch-{i}" for i in range(o.batch_users - 2))]
    targets = r.package(users)
    for target in targets:
        r.invoke(target)

    def together(rounds: int) -> tuple[float, list[float]]:
        latencies: list[float] = []
        lock = threading.Lock()

        def client(target: str) -> None:
            for _ in range(rounds):
                seconds = r.invoke(target)[1]
                with lock:
                    latencies.append(seconds)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            list(pool.map(client, targets))
        return time.perf_counter() - t0, latencies

    together(1)  # warm-up: the batch shapes' first calls
    t0 = time.perf_counter()
    alone = [r.invoke(target)[1] for target in targets]
    serial_s = time.perf_counter() - t0
    wall, latencies = together(o.batch_rounds)
    serial_rate = len(targets) / serial_s
    rate = len(latencies) / wall
    return {
        "users": len(targets),
        "requests_concurrent": len(latencies),
        "seconds": {"one at a time": alone, "concurrent latencies": latencies},
        "figures": {
            "one request at a time": fig(round(serial_rate, 3), "images/s"),
            f"{len(targets)} concurrent clients": fig(round(rate, 3), "images/s"),
            "concurrent / one at a time": fig(
                round(rate / serial_rate, 2), "x", f"throughput; goal {GOALS['batching']}"
            ),
            "latency one at a time, median": fig(round(median(alone), 3), "s"),
            "latency concurrent, median": fig(round(median(latencies), 3), "s"),
            "latency concurrent, p95": fig(round(p95(latencies), 3), "s"),
        },
    }


def measure_repair(ctx) -> dict[str, Any]:
    """(f) SIGKILL the shared base's process (as the OOM killer would); a user's requests are
    answered 503 (retry) until it is back, restarted by the user model."""
    r = rig(ctx)
    target = r.packaged["bench-a"]
    r.invoke(target)
    stub = r.shared_base_stub()
    if stub is None:
        raise RuntimeError("no shared base process found among the server's stubs")
    from avatarforge.mme.loader import ModelUnavailableError

    os.kill(stub.pid, signal.SIGKILL)
    t0 = time.perf_counter()
    statuses: list[int] = []
    deadline = t0 + 600
    while True:
        try:
            r.invoke(target)
            break
        except ModelUnavailableError as exc:  # what the MME answers 503 + Retry-After
            statuses.append(exc.status)
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.2)
    repaired = time.perf_counter() - t0
    after = [r.invoke(target)[1] for _ in range(2)]
    new = r.shared_base_stub()
    return {
        "statuses_before_repair": statuses,
        "figures": {
            "killed shared base -> next image": fig(
                round(repaired, 2), "s", "restart, pipeline load, compile from cache"
            ),
            "answers before it was back": fig(len(statuses), "", "503: send again"),
            "warm image after the repair": fig(round(median(after), 4), "s"),
            "a new shared base process": fig(new is not None and new.pid != stub.pid),
        },
    }


def measure_residents(ctx) -> dict[str, Any]:
    """(e) ``--residents`` user models loaded at once through the SageMaker front end (as an
    MME instance holds them): each stub's private memory, and the GPU's memory, as they grow."""
    from avatarforge.mme.loader import model_hash
    from avatarforge.mme.protocol import SageMakerTritonClient
    from avatarforge.serving.package import unpack_package
    from avatarforge.serving.processes import private_dirty_bytes, stub_processes

    r = rig(ctx)
    n = ctx.opts.residents
    users = [f"bench-res-{i:04d}" for i in range(n)]
    t0 = time.perf_counter()
    targets = r.package(users)
    package_s = time.perf_counter() - t0
    client = SageMakerTritonClient(r.server.sagemaker_url, 1800, 1800)
    root = ctx.work / "residents"
    base_stub = r.shared_base_stub()
    marks = sorted({1, max(1, n // 4), max(1, n // 2), n})
    rows: list[dict[str, Any]] = []
    errors: list[str] = []

    def load(target: str) -> None:
        name = model_hash(target)
        repo = root / name / "model"
        repo.parent.mkdir(parents=True, exist_ok=True)
        unpack_package(r.source / target, repo)
        client.load(name, str(repo.resolve()), target)

    def snapshot(count: int, seconds: float) -> dict[str, Any]:
        stubs = [s for s in stub_processes(r.server.pid)
                 if base_stub is None or s.pid != base_stub.pid]  # fmt: skip
        users_now = [s for s in stubs if s.instance.startswith("bench-res-")]
        private = [s.private_dirty_bytes() / 2**20 for s in users_now]
        by_pid = gpu_memory_by_pid()
        return {
            "users": count,
            "load_s": round(seconds, 1),
            "user_stubs": len(users_now),
            "private_dirty_mib_median": round(median(private), 2),
            "private_dirty_mib_max": round(max(private, default=0), 2),
            "tritonserver_private_dirty_mib": round(private_dirty_bytes(r.server.pid) / 2**20, 1),
            "gpu_used_mib": gpu_memory_used_mib(),
            "gpu_mib_of_user_stubs": round(sum(by_pid.get(s.pid, 0.0) for s in users_now), 1),
            "gpu_mib_of_shared_base": by_pid.get(base_stub.pid) if base_stub else None,
        }

    rows.append(snapshot(0, 0.0))
    loaded = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=ctx.opts.load_workers) as pool:
        for mark in marks:
            batch = targets[loaded:mark]
            for future in [pool.submit(load, t) for t in batch]:
                try:
                    future.result()
                    loaded += 1
                except Exception as exc:  # recorded: how far it got is the finding
                    errors.append(f"{type(exc).__name__}: {exc}"[:500])
            rows.append(snapshot(loaded, time.perf_counter() - t0))
            if errors:
                break
    # a request to three of them: what a user that has answered costs
    answered = []
    for target in targets[: min(3, loaded)]:
        response = client.invoke(model_hash(target), target, r.request.encode())
        answered.append(response.status)
    after = snapshot(loaded, time.perf_counter() - t0)
    first, last = rows[1] if len(rows) > 1 else rows[0], rows[-1]
    span = max(1, last["users"] - first["users"])
    slope = None
    if first.get("gpu_used_mib") is not None and last.get("gpu_used_mib") is not None:
        slope = round((last["gpu_used_mib"] - first["gpu_used_mib"]) / span, 3)
    figures = {
        "resident user models": fig(loaded, "", f"of {n} asked"),
        "package them (parallel)": fig(round(package_s, 1), "s"),
        f"load them ({ctx.opts.load_workers} at a time, POST /models)": fig(
            last["load_s"], "s", f"{round(loaded / max(last['load_s'], 1e-9), 1)} loads/s"
        ),
        "private memory per user stub, median": fig(last["private_dirty_mib_median"], "MiB"),
        "private memory per user stub after a request, median": fig(
            after["private_dirty_mib_median"], "MiB", "Private_Dirty"
        ),
        "GPU memory of the user stubs": fig(last["gpu_mib_of_user_stubs"], "MiB", "goal 0"),
        f"GPU memory per further user ({first['users']} -> {last['users']})": fig(
            slope, "MiB", "device-wide; goal 0 (flat)"
        ),
    }
    if errors:
        figures["load errors"] = fig(len(errors), "", errors[0])
    return {
        "marks": rows,
        "after_requests": after,
        "request_statuses": answered,
        "errors": errors[:20],
        "figures": figures,
    }
