"""The model hub: fetching a real base (only when allowed), or finding one already in the local
hub cache (never a download)."""

from __future__ import annotations

from pathlib import Path

from .identity import BaseError


def download(hub_id: str) -> Path:
    """The local folder of ``hub_id``'s snapshot (downloaded once, then the hub's cache)."""
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        hub_id, allow_patterns=["*.json", "*.txt", "*.safetensors"], ignore_patterns=["*ema*"]
    )
    return Path(local)


def local_snapshot(hub_id: str, revision: str | None = None) -> Path:
    """The folder of ``hub_id``'s snapshot in the local hub cache (HF_HUB_CACHE, HF_HOME),
    without any network: a BaseError says how to get it there when it is not."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if hub_id.count("/") != 1 or hub_id.startswith(("/", ".", "~")):
        raise BaseError(f"{hub_id!r}: no such folder, and not a hub id (organisation/name)")
    try:
        return Path(snapshot_download(hub_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as exc:
        raise BaseError(
            f"{hub_id} is not in the local hub cache ({constants.HF_HUB_CACHE}) and nothing is "
            "downloaded here: download it where there is network, e.g. `hf download "
            f"{hub_id} --include '*.json' '*.txt' '*.fp16.safetensors'`, and copy the cache "
            f"(or point HF_HUB_CACHE at it), or give the folder ({type(exc).__name__})"
        ) from None
