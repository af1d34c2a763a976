"""A safety checker built from config with random weights, as the tiny base is: the real
``StableDiffusionSafetyChecker`` class and file layout at a tiny size, whose verdict is set by
its concept thresholds, so tests know what it flags without real weights (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SIDE = 32  # the tiny CLIP vision tower's input


def build_tiny_safety_checker(
    out: Path, *, flag_everything: bool, layout: str = "pipeline"
) -> Path:
    """Write a checker to ``out`` (``layout``: "pipeline", as diffusers pipeline folders keep it
    in safety_checker/ + feature_extractor/, or "flat", as CompVis/stable-diffusion-safety-checker
    is published). A score is the cosine similarity to a concept minus its threshold, in
    [-1, 1]: thresholds of -2 flag every image, +2 none."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
             "num_attention_heads": 4}  # fmt: skip
    config = CLIPConfig(
        text_config={**small, "vocab_size": 1000},
        vision_config={**small, "image_size": IMAGE_SIDE, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    threshold = -2.0 if flag_everything else 2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    out = Path(out)
    model, processor = (out / "safety_checker", out / "feature_extractor")
    if layout == "flat":
        model = processor = out
    checker.save_pretrained(model)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    ).save_pretrained(processor)
    return out
