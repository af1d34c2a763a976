"""Silencing the hub libraries (diffusers, transformers): our own logs say what matters."""

from __future__ import annotations

import os


def quiet_hf() -> None:
    """Silence hub-library chatter (load bars, torchvision notices); our logs say what matters."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
