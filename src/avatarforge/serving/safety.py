"""The shared base's optional image safety check (``serving.safety_checker``; off by default).

SD 2.x ships without a safety checker: its training data was filtered with LAION's NSFW
classifier instead (punsafe 0.1 for 2.0; 2.1's fine-tune relaxed it to 0.98), so it renders
explicit images less readily than SD 1.x, not never. An operator who wants a check names a
classifier in diffusers' ``StableDiffusionSafetyChecker`` format (CLIP ViT-L/14 and concept
embeddings, as SD 1.x pipelines and ``CompVis/stable-diffusion-safety-checker`` carry it): a
folder with its ``config.json`` and weights and the CLIP image processor's
``preprocessor_config.json``, flat or as a pipeline's ``safety_checker/`` and
``feature_extractor/``. Every answer is checked before it leaves the shared base; a flagged
image is replaced by a black one of its size and counted (``flagged`` on /metrics and in the
log), never returned. What it does not do: judge prompts, recognise who is in an image (consent
is the operator's, see the README), or catch what its concepts do not describe.

The check reads the JPEGs about to be sent (a decode costs milliseconds; the classifier one
batched call per Triton batch), so it sees exactly what a client would get, on every path
(batched or not) alike.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..generate import to_jpeg_base64
from ..settings import ConfigError

log = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


def checker_folders(folder: Path) -> tuple[Path, Path]:
    """(the classifier's folder, the image processor's folder) of a checker folder, flat or a
    pipeline's subfolders; ConfigError naming the setting when either is missing."""
    folder = Path(folder)
    model, processor = folder, folder
    if (folder / "safety_checker").is_dir():
        model, processor = folder / "safety_checker", folder / "feature_extractor"
    wanted = {
        model / "config.json": [model / "config.json"],
        model / MODEL_FILES[0]: [model / f for f in MODEL_FILES],  # either weights file
        processor / "preprocessor_config.json": [processor / "preprocessor_config.json"],
    }
    missing = [str(name) for name, files in wanted.items() if not any(f.is_file() for f in files)]
    if missing:
        raise ConfigError(
            f"serving.safety_checker: {folder} is not a StableDiffusionSafetyChecker folder "
            f"(missing {', '.join(missing)})"
        )
    return model, processor


@dataclass
class SafetyCheck:
    """A loaded classifier: :meth:`flags` says which images it flags, :meth:`screen` replaces
    them in the output arrays about to be sent."""

    checker: object  # diffusers' StableDiffusionSafetyChecker
    processor: object  # transformers' CLIPImageProcessor
    device: str

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> SafetyCheck:
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        model, processor = checker_folders(Path(folder))
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        checker = StableDiffusionSafetyChecker.from_pretrained(
            model, torch_dtype=dtype, local_files_only=True
        )
        checker.to(device).eval()
        log.info("safety check on: %s (%s)", folder, device)
        return cls(checker, CLIPImageProcessor.from_pretrained(processor), device)

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """Whether the classifier flags each image (any concept or special-care score > 0)."""
        if not images:
            return []
        import torch

        pixels = self.processor([im.convert("RGB") for im in images], return_tensors="pt")
        clip_input = pixels.pixel_values.to(self.device, self.checker.dtype)
        placeholders = np.zeros((len(images), 1, 1, 3), dtype=np.float32)  # not returned
        with torch.no_grad():
            _, flagged = self.checker(clip_input=clip_input, images=placeholders)
        return [bool(f) for f in flagged]

    def screen(self, results: list) -> list[int]:
        """Replace every flagged image of the output arrays in ``results`` (errors are left as
        they are) by a black JPEG of its size, in place; the number replaced per result."""
        where, images = [], []
        for i, result in enumerate(results):
            if isinstance(result, np.ndarray):
                for index in np.ndindex(result.shape):
                    where.append((i, index))
                    images.append(_decode(result[index]))
        counts = [0] * len(results)
        for (i, index), image, flagged in zip(where, images, self.flags(images), strict=True):
            if flagged:
                black = Image.new("RGB", image.size)
                results[i][index] = to_jpeg_base64(black).encode("ascii")
                counts[i] += 1
        return counts


def _decode(item: bytes | str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item)))
    image.load()
    return image
