"""Fetching a real base from the model hub: only its configs, vocabularies and safetensors."""

from __future__ import annotations

from pathlib import Path


def download(hub_id: str) -> Path:
    """The local folder of ``hub_id``'s snapshot (downloaded once, then the hub's cache)."""
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        hub_id, allow_patterns=["*.json", "*.txt", "*.safetensors"], ignore_patterns=["*ema*"]
    )
    return Path(local)
