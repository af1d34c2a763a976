"""Measured throughput behind the MME's scaling target and the plan's cost per image and per job.

The figures were measured by ``bench/gpu.py`` on one GPU and kept in :data:`SOURCE`. They are
copied here because an installed package cannot read the repository's ``bench/`` folder;
``tests/test_deploy_plan.py`` reads the file and fails when a figure here no longer matches it.

Only an H200 was measured. An A10G (the ml.g5 types deploy defaults to) is an ESTIMATE: the H200's
time times :data:`A10G_FACTOR`, the factor ``bench/gpu.py`` and ``serving.max_request_cost``
already assume. The plan says which figures are estimates and where they come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .prices import hourly_usd

SOURCE = "bench/results/gpu-h200-2026-11-26.json"
MEASURED_GPU = "NVIDIA H200"
# measurements.generation, "avatarforge generate_images, median": 512x512, 30 DDIM steps,
# guidance 7.5, one image per request: the serving defaults (generate.GenArgs)
SECONDS_PER_IMAGE = 0.7465
GENERATION_FIGURE = "generation: avatarforge generate_images, median"
WORKLOAD = "512x512, 30 steps, 1 image per request (the serving defaults), one request at a time"
# measurements.training, "projected job (50 class images, 800 steps)": TrainConfig's defaults
TRAINING_JOB_MINUTES = 5.22
TRAINING_FIGURE = "training: projected job (50 class images, 800 steps)"
A10G_FACTOR = 4  # an A10G takes about 4x an H200's time (bench/gpu.py, serving.max_request_cost)
# Target tracking holds invocations per instance near the target: a quarter of the measured
# throughput is left for bursts while a new instance starts (minutes) and for cold user models.
TARGET_UTILISATION = 0.75


@dataclass(frozen=True)
class GPU:
    name: str
    count: int  # GPUs per instance
    factor: float  # time of a job on it / on the measured H200
    estimate: bool  # False only for the GPU that was measured


def _a10g(count: int) -> GPU:
    return GPU("NVIDIA A10G", count, A10G_FACTOR, True)


INSTANCE_GPUS: dict[str, GPU] = {
    **{f"ml.g5.{size}": _a10g(1) for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge")},
    "ml.g5.16xlarge": _a10g(1),
    "ml.g5.12xlarge": _a10g(4),
    "ml.g5.24xlarge": _a10g(4),
    "ml.g5.48xlarge": _a10g(8),
    "ml.p5en.48xlarge": GPU(MEASURED_GPU, 8, 1, False),
}


def gpu_of(instance_type: str) -> GPU | None:
    return INSTANCE_GPUS.get(instance_type)


def serving_throughput(instance_type: str) -> dict | None:
    """Images per minute of one MME instance at the serving defaults, or None where no figure
    applies: an unknown GPU, or several GPUs (the shared base runs on one of them)."""
    gpu = gpu_of(instance_type)
    if gpu is None or gpu.count != 1:
        return None
    seconds = SECONDS_PER_IMAGE * gpu.factor
    basis = f"{SECONDS_PER_IMAGE} s/image measured on an {MEASURED_GPU}"
    if gpu.estimate:
        basis += f", x{gpu.factor:g} for an {gpu.name} (an ESTIMATE, not measured)"
    return {
        "images_per_minute": round(60 / seconds, 1),
        "seconds_per_image": round(seconds, 3),
        "gpu": gpu.name,
        "estimate": gpu.estimate,
        "workload": WORKLOAD,
        "basis": basis,
        "source": f"{SOURCE} ({GENERATION_FIGURE})",
    }


def mme_scaling(instance_type: str, configured: int) -> dict:
    """The MME's target of SageMakerVariantInvocationsPerInstance (per minute) and where it comes
    from: the configured value, else TARGET_UTILISATION of the measured throughput (one image
    per invocation at the defaults). ``target`` is None when neither exists."""
    throughput = serving_throughput(instance_type)
    if configured:
        return {"target": configured, "from": "deploy.mme_invocations_per_instance",
                "throughput": throughput}  # fmt: skip
    if throughput is None:
        return {"target": None, "from": None, "throughput": None}
    target = max(1, math.floor(throughput["images_per_minute"] * TARGET_UTILISATION))
    origin = f"{TARGET_UTILISATION:.0%} of {throughput['images_per_minute']} images/min"
    return {"target": target, "from": origin, "throughput": throughput}


def serving_cost(instance_type: str, throughput: dict | None, target: int | None) -> dict | None:
    """USD per 1,000 images on busy instances at the measured throughput, and at the scaling
    target (what instances cost while autoscaling holds them there)."""
    price = hourly_usd(instance_type)
    if price is None or throughput is None:
        return None
    per_image_busy = price / 60 / throughput["images_per_minute"]
    out = {"usd_per_1000_images": round(per_image_busy * 1000, 2)}
    if target:
        out["usd_per_1000_images_at_target"] = round(price / 60 / target * 1000, 2)
    return out


def training_cost(instance_type: str) -> dict | None:
    """Minutes and USD of one training job at TrainConfig's defaults, alone on an instance."""
    gpu, price = gpu_of(instance_type), hourly_usd(instance_type)
    if gpu is None:
        return None
    minutes = TRAINING_JOB_MINUTES * gpu.factor
    basis = f"{TRAINING_JOB_MINUTES} min projected on an {MEASURED_GPU}"
    if gpu.estimate:
        basis += f", x{gpu.factor:g} for an {gpu.name} (an ESTIMATE, not measured)"
    return {
        "minutes_per_job": round(minutes, 1),
        "usd_per_job": None if price is None else round(price * minutes / 60, 2),
        "gpu": gpu.name,
        "estimate": gpu.estimate,
        "basis": basis,
        "source": f"{SOURCE} ({TRAINING_FIGURE})",
    }
