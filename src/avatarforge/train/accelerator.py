"""The run's :class:`accelerate.Accelerator`: autocast, loss scaling, accumulation, clipping.

What accelerate does here: ``autocast()`` (fp16/bf16 on CUDA), the fp16 ``GradScaler`` inside
``backward`` / ``clip_grad_norm_`` / the wrapped optimizer's ``step`` (a step whose gradients
overflowed is skipped), and gradient accumulation (``accumulate`` divides each micro-batch's
loss and lets the optimizer step only on the last one).

What it does not: device placement (ours: the ``device`` setting may name ``cuda:1`` or
``mps``, which accelerate only picks through its launcher's environment), random state (ours:
noise, timesteps and data order are pure functions of (seed, step), so a resume needs none) and
checkpoints (ours: LoRA weights only, atomic, identity-checked; see :mod:`.checkpoint`).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def make_accelerator(precision: str, accumulation: int, device: str):
    """An Accelerator for one run: ``precision`` 'no', 'fp16' or 'bf16' (see
    :func:`.models.resolve_precision`), ``accumulation`` micro-batches per optimizer step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = {
        "mixed_precision": precision,
        "gradient_accumulation_steps": accumulation,
        "cpu": not device.startswith("cuda"),
        "device_placement": False,
    }
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
    # accelerate keeps one state per process and refuses another precision or device in it (a
    # CPU run after a CUDA one, fp16 after bf16). Runs here are sequential and own nothing of
    # each other's, so the next one starts from a fresh state, as accelerate's own tests do.
    log.info("accelerate: new process state for precision %s on %s", precision, device)
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kwargs)
