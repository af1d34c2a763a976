"""Resumable checkpoints: LoRA weights (fp32, peft naming), optimizer state, step, losses.

Noise, timesteps and data order are pure functions of (seed, step), so no random state is saved
and a resumed run repeats exactly what the uninterrupted run would have done. Only the newest
checkpoint is kept; each is written to a temporary folder and renamed into place, so a crash
while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TrainingError

LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    step: int  # optimizer steps completed
    losses: list[float]
    identity: dict[str, Any]  # config result fields, dataset hash, base hash


def latest(root: Path) -> Path | None:
    found = sorted(p for p in Path(root).glob(f"{PREFIX}*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def saved_step(root: Path) -> int:
    """The step of the newest checkpoint under ``root`` (0 if none), without checking that it
    fits a run: for estimates and messages; :func:`load` checks."""
    path = latest(root)
    if path is None:
        return 0
    try:
        return int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def save(
    root: Path,
    step: int,
    lora: dict[str, Any],
    optimizer_state: dict[str, Any],
    losses: list[float],
    identity: dict[str, Any],
) -> Path:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=root))
    final = root / f"{PREFIX}{step:07d}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, tmp / LORA_FILE)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        state = {"step": step, "losses": losses, "identity": identity}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob(f"{PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, identity: dict[str, Any]) -> tuple[Checkpoint, dict[str, Any], dict[str, Any]]:
    """(checkpoint, lora state, optimizer state); refuses one made with other settings."""
    import torch
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
        lora = load_file(path / LORA_FILE)
        optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainingError(
            f"checkpoint {path} is unreadable ({exc}); delete it to start over"
        ) from None
    if state.get("identity") != identity:
        theirs = state.get("identity", {})
        diff = sorted(
            k
            for k in set(theirs) | set(identity)
            if k != "config" and theirs.get(k) != identity.get(k)
        )
        old_cfg, new_cfg = theirs.get("config", {}), identity.get("config", {})
        diff += sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        raise TrainingError(
            f"checkpoint {path} was made with other settings ({', '.join(diff)}); "
            "delete it or train with resume off"
        )
    ckpt = Checkpoint(path, int(state["step"]), list(state["losses"]), identity)
    return ckpt, lora, optimizer_state
