"""`avatarforge train` and `avatarforge generate-local`.

The train command's options are made from :class:`~avatarforge.train.TrainConfig`'s fields, so a
default, bound or help text is written once, in the config; ``--preset`` starts from a named
set of them (:data:`~avatarforge.train.config.PRESETS`) and the options given win.

Without a GPU it first says what that means: a measured estimate of the run's time, and the
preset for a first result in minutes. SIGINT/SIGTERM stop a run resumably (exit code 3).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import typer

from ..names import check_user_id
from ..train.config import PRESETS, TrainConfig
from .common import config_options, console, denoising_bar, fail, save_images

QUICK = "cpu-quick"
STOPPED = 3  # exit code of a run that stopped resumably (time box, signal)
RESUME_HINT = (
    "run the same command again to resume (--resume is the default; --no-resume starts over)"
)


class _Stop(BaseException):
    """Raised by the signal handler to stop at once (nothing to save, or asked twice)."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


class StopOnSignal:
    """SIGINT and SIGTERM while ``train`` runs: once a step of this run is done, finish the
    current step, save a checkpoint and stop (the trainer's ``should_stop``); before that there
    is nothing new to save (class images are cached one by one), so stop at once. A second
    signal stops at once. Installed only in the main thread (where Python delivers signals)."""

    def __init__(self) -> None:
        self.received = ""
        self.steps_done = 0
        self.phase = "preparing"
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        again = bool(self.received)
        self.received = name
        if again or not self.steps_done:
            raise _Stop(name)
        console.print(
            f"[yellow]{name}:[/] stopping after this step with a checkpoint "
            "(send it again to stop at once)"
        )

    def on_step(self, info) -> None:
        self.steps_done += 1
        self.phase = "training"

    def should_stop(self) -> bool:
        return bool(self.received)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _given(ctx: typer.Context, options: dict) -> dict:
    """The options typed on the command line (they win over a preset)."""
    # by name: typer ships its own copy of click, whose ParameterSource is another class
    sources = {name: getattr(ctx.get_parameter_source(name), "name", "") for name in options}
    return {
        name: options[name]
        for name, source in sources.items()
        if source not in ("", "DEFAULT", "DEFAULT_MAP")
    }


SUGGEST_PRESET_S = 5 * 60  # a CPU run estimated above this is told about the quick preset


def cpu_notice(est, config: TrainConfig, quick: TrainConfig | None = None, quick_est=None) -> str:
    """What a CPU run is told before its long work starts: the measured estimate, the quick
    preset (with its own estimate) when given, and how stopping and resuming work."""
    lines = [f"  estimate at {est.resolution} px, measured on this machine:"]
    if est.class_images:
        lines.append(
            f"    class images  {est.class_images} to make x {est.class_image_steps} steps x "
            f"{est.denoise_s:.3f} s = {_duration(est.class_images_s)}"
        )
    lines += [
        f"    setup         load the models, encode {est.encode_images} images = "
        f"{_duration(est.setup_s)}",
        f"    training      {est.steps} steps x {est.step_s:.2f} s = {_duration(est.training_s)}",
        f"    in all        about {_duration(est.total_s)}",
    ]
    if quick is not None and quick_est is not None:
        lines.append(
            f"  For a first result in minutes: --preset {QUICK} ({quick.resolution} px, "
            f"{quick.steps} steps, {quick.num_class_images} class images: about "
            f"{_duration(quick_est.total_s)} here); options you give override it."
        )
    minutes = f" and every {config.checkpoint_minutes:g} min" if config.checkpoint_minutes else ""
    # "resume checkpoint", not "checkpoint": the trainer's log also names gradient checkpointing
    lines.append(
        f"  Resume checkpoints (the LoRA weights so far) are saved every "
        f"{config.checkpoint_every} steps{minutes}; Ctrl-C or SIGTERM saves one and stops "
        "(exit code 3); run the same command again to resume."
    )
    return "\n".join(lines)


def _say_cpu_estimate(base, config, preset, given, dataset_images, out_dir) -> float:
    """Measure and print what training on the CPU means for this run; returns the estimate."""
    import torch

    from ..train.estimate import estimate_run

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    why = "No GPU" if not torch.cuda.is_available() else "--device cpu"
    headline = f"{why}: this run trains on the CPU ({cores} cores, float32)."
    console.print(f"{headline} Measuring its steps for an estimate...", highlight=False)
    est = estimate_run(base, config, "cpu", instance_images=dataset_images, out_dir=out_dir)
    quick = quick_est = None
    if preset != QUICK and est.total_s > SUGGEST_PRESET_S:
        quick = TrainConfig(**{**PRESETS[QUICK], **given})
        quick_est = estimate_run(base, quick, "cpu", instance_images=dataset_images)
    console.print(cpu_notice(est, config, quick, quick_est), highlight=False)
    return est.total_s


@config_options(TrainConfig)
def train_command(
    ctx: typer.Context,
    dataset_dir: Path = typer.Argument(
        ..., help="preprocessed dataset (folder with manifest.json)"
    ),
    user: str = typer.Option(..., "--user", help="user name: names the output folder and model"),
    out: Path = typer.Option(
        None, help="output folder (default: build/users/USER); the adapter goes to <out>/adapter"
    ),
    preset: str = typer.Option(
        "",
        "--preset",
        help=f"start from named settings ({', '.join(PRESETS)}); options given override them. "
        f"{QUICK}: a first result in minutes on a CPU (128 px, 60 steps)",
    ),
    **options,
) -> None:
    """Train a DreamBooth LoRA (UNet + text encoder) on the serving base; resumable
    (a stopped run continues from its last checkpoint when run again)."""
    import time

    from ..base.config import BaseConfig, resolve_base
    from ..base.pipeline import best_device
    from ..paths import build_dir
    from ..train import TrainingStopped, train
    from ..train import checkpoint as ckpt
    from ..train.data import read_dataset
    from ..train.loop import CHECKPOINT_DIR, run_class_images

    check_user_id(user, field="--user")
    if preset and preset not in PRESETS:
        fail(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    given = _given(ctx, options)
    out_dir = out or build_dir() / "users" / user
    estimated = 0.0
    stop = StopOnSignal()
    try:
        config = TrainConfig(**{**options, **PRESETS.get(preset, {}), **given})
        dataset = read_dataset(dataset_dir)
        base = resolve_base(BaseConfig(base=config.base))
        device = config.device or best_device()
        resumed = ckpt.saved_step(out_dir / CHECKPOINT_DIR) if config.resume else 0
        with stop:
            if not device.startswith("cuda"):
                estimated = _say_cpu_estimate(
                    base, config, preset, given, len(dataset.images), out_dir
                )
            started = time.perf_counter()
            if resumed:
                console.print(f"resuming from the checkpoint of step {resumed} in {out_dir}")
            elif "resume" in given and config.resume:
                console.print(f"no checkpoint in {out_dir}: starting from step 0")
            if config.prior_preservation:  # made here to say so if stopped; train() reuses them
                stop.phase = "making class images"
                run_class_images(base, config, device)
            stop.phase = "loading the models"
            result = train(
                dataset_dir,
                out_dir,
                config,
                base,
                on_step=stop.on_step,
                should_stop=stop.should_stop,
            )
    except _Stop as exc:
        kept = ckpt.saved_step(out_dir / CHECKPOINT_DIR)
        saved = f"the checkpoint of step {kept} is kept" if kept else "no step is saved yet"
        if stop.phase == "making class images":
            saved = f"the class images made so far are cached, {saved}"
        console.print(
            f"[yellow]stopped[/] by {exc.signame} while {stop.phase}: {saved}; {RESUME_HINT}",
            soft_wrap=True,
        )
        raise typer.Exit(STOPPED) from None
    except TrainingStopped as exc:
        why = f"by {stop.received}" if stop.received else "(--max-steps-this-run)"
        console.print(
            f"[yellow]stopped[/] {why} after step {exc.step} of {exc.total}; checkpoint at "
            f"{exc.checkpoint}; {RESUME_HINT}",
            soft_wrap=True,
        )
        raise typer.Exit(STOPPED) from None
    console.print(f"adapter [bold]{result.adapter_dir}[/]")
    took = time.perf_counter() - started
    versus = f" (estimated {_duration(estimated)})" if estimated else ""
    console.print(
        f"{result.steps} steps, final loss {result.losses[-1]:.4f}, "
        f"{result.step_seconds:.3f} s/step, peak memory {result.peak_memory_bytes / 2**20:.0f} MiB "
        f"({result.device}); class images and training took {_duration(took)}{versus}",
        highlight=False,
    )


def generate_local(
    adapter: Path = typer.Option(
        ..., "--adapter", help="adapter folder made by `avatarforge train`"
    ),
    prompt: str = typer.Option(
        ..., "--prompt", help="prompt; name the person with the token, e.g. <<TOK>>"
    ),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="negative prompt"),
    gen_args: str = typer.Option(
        "", "--gen-args", help='generation parameters as JSON, e.g. {"steps": 30, "seed": 1}'
    ),
    out: Path = typer.Option(
        None, help="output folder (default: build/generate-local/ADAPTER-PARENT)"
    ),
    image_format: str = typer.Option("jpeg", "--format", help="jpeg or png"),
    base: str = typer.Option(
        "",
        "--base",
        help="where the base is, if not where the adapter says (its hash is still checked)",
    ),
    device: str = typer.Option("", help="torch device ('' : cuda when available, else cpu)"),
) -> None:
    """Generate with diffusers directly: the reference the Triton path is compared against."""
    from ..adapter import base_config_for, load_adapter, read_adapter
    from ..base.config import BaseConfig, resolve_base
    from ..base.pipeline import load_pipeline
    from ..generate import GenArgs, generate_images
    from ..paths import build_dir

    if image_format not in ("jpeg", "png"):
        fail(f"--format: must be jpeg or png (got {image_format!r})")
    args = GenArgs.parse(gen_args)
    meta = read_adapter(adapter)
    info = resolve_base(BaseConfig(base=base) if base else base_config_for(meta))
    # on a CPU a real base loads for tens of seconds and denoises for minutes: say each phase
    with console.status(f"loading base {info.base_id} and the adapter", spinner="line"):
        pipe = load_pipeline(info, device=device or None)
        load_adapter(pipe, adapter, info, "user")
    images = generate_images(
        pipe, prompt, negative_prompt or None, args, on_step=denoising_bar(str(pipe.device))
    )
    folder = out or build_dir() / "generate-local" / Path(adapter).resolve().parent.name
    save_images(images, folder, suffix=f"-seed{args.seed}", image_format=image_format)


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
    app.command("train")(train_command)
    app.command("generate-local")(generate_local)
