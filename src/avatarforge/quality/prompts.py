"""The fixed, seeded prompt set of `avatarforge eval`: the same images for every adapter.

Each template runs twice per seed with the adapter loaded: with the user's token ("<<TOK>>
person": identity, should be the user) and without it ("person": leakage, must not be). Both
use the same seed, so each pair starts from the same noise. Photographic prompts and a negative
prompt against paintings: the face detector and the embedding are made for photos.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metric import IDENTITY, LEAKAGE

TEMPLATES = (
    "a photo of {subject}",
    "a close-up portrait photo of {subject}, looking at the camera, natural light",
    "a headshot of {subject} in a studio, plain background, sharp focus",
    "a photo of {subject} smiling outdoors, daylight",
    "a photo of {subject} wearing a jacket, upper body, city street",
    "a professional portrait of {subject}, soft lighting, 85mm lens",
    "a candid photo of {subject} sitting in a cafe",
    "a photo of {subject} at the beach, looking at the camera",
)
NEGATIVE_PROMPT = (
    "painting, drawing, cartoon, 3d render, blurry, lowres, deformed, disfigured, "
    "cropped face, out of frame, multiple people"
)
CLASS_NOUN = "person"  # the class of prior preservation ("a photo of person")


@dataclass(frozen=True)
class EvalPrompt:
    kind: str  # IDENTITY or LEAKAGE
    prompt: str
    seed: int


def prompt_set(token: str, prompts: int, seeds: int, seed: int = 0) -> list[EvalPrompt]:
    """The first ``prompts`` templates x ``seeds`` seeds, each as an identity and a leakage
    prompt (in that order, per template and seed)."""
    if not 1 <= prompts <= len(TEMPLATES):
        raise ValueError(f"prompts: must be 1 to {len(TEMPLATES)} (got {prompts})")
    out = []
    for template in TEMPLATES[:prompts]:
        for s in range(seed, seed + seeds):
            out.append(EvalPrompt(IDENTITY, template.format(subject=f"{token} {CLASS_NOUN}"), s))
            out.append(EvalPrompt(LEAKAGE, template.format(subject=CLASS_NOUN), s))
    return out
