"""A small training folder in the preprocess contract, made without running preprocessing."""

from __future__ import annotations

import json
from pathlib import Path


def write_dataset(out: Path, count: int = 4) -> Path:
    """A tiny dataset in the preprocess contract (crops of skimage's astronaut portrait), for
    tests and benchmarks that need a dataset without running preprocessing."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut())
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    items = []
    for i in range(count):
        box = (40 + 12 * i, 10 + 8 * i, 340 + 12 * i, 310 + 8 * i)
        crop = img.crop(box).resize((512, 512), Image.Resampling.BICUBIC)
        name = f"astronaut-{i}.png"
        crop.save(out / "images" / name)
        Image.new("L", (512, 512), 255).save(out / "masks" / name)
        items.append(
            {
                "source": f"astronaut-{i}.jpg",
                "status": "kept",
                "reason": None,
                "image": f"images/{name}",
                "mask": f"masks/{name}",
                "face_box": [150, 100, 350, 330],
                "scores": {},
            }
        )
    items.append(
        {"source": "cat.jpg", "status": "rejected", "reason": "no face", "image": None,
         "mask": None, "face_box": None, "scores": {}}
    )  # fmt: skip
    manifest = {"version": 1, "config": {}, "items": items, "kept": count, "rejected": 1}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
