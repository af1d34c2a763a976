"""The preprocess step's settings: every default and bound in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AvatarforgeError
from ..settings import ConfigError, Settings, setting


class PreprocessError(AvatarforgeError, RuntimeError):
    """The preprocess step as a whole cannot go on (not one bad file: those are rejected)."""


class NotEnoughPhotosError(PreprocessError):
    """Fewer usable photos than ``min_images`` remain; the message says what was rejected and
    ``manifest`` is the manifest that was written anyway."""

    status = 400

    def __init__(self, message: str, manifest=None) -> None:
        super().__init__(message)
        self.manifest = manifest


@dataclass
class PreprocessConfig(Settings):
    section = "preprocess"

    size: int = setting(
        512, "side of the square output images and masks, in pixels", ge=64, le=2048
    )
    margin: float = setting(
        0.8,
        "space around the face on each side of the crop, as a fraction of the face size",
        ge=0.0,
        le=3.0,
    )
    pad_mode: str = setting(
        "blur",
        "how to fill where the square crop leaves the photo (never stretched): blur continues "
        "the photo's border out of focus; edge (repeated edge pixels) draws streaks a model "
        "learns, reflect a mirrored face",
        choices=("blur", "edge", "reflect", "constant"),
    )
    min_side: int = setting(256, "reject photos whose shorter side is below this", ge=16, le=8192)
    max_pixels: int = setting(
        100_000_000,
        "reject photos with more pixels than this (decompression-bomb guard; a PNG, WebP or HEIC "
        "is decoded whole first: about 4 bytes a pixel)",
        ge=1_000_000,
        le=178_956_970,  # PIL refuses more than 2 x its own limit anyway
    )
    work_side: int = setting(
        4096,
        "photos with a longer side above this are reduced by a whole factor as they are decoded "
        "(JPEG at 1/2 to 1/8 scale directly) to bound memory; 12 MP phone photos are not",
        ge=1024,
        le=16384,
    )
    detector: str = setting(
        "hog", "face detector: dlib HOG (fast) or dlib CNN (slow on CPU)", choices=("hog", "cnn")
    )
    upsample: int = setting(
        1, "detector upsampling passes (finds smaller faces, slower)", ge=0, le=3
    )
    detect_side: int = setting(
        1024, "photos are shrunk to this longer side for face detection only", ge=256, le=8192
    )
    min_face_px: int = setting(
        64, "reject photos whose largest face is smaller than this (source pixels)", ge=16, le=4096
    )
    max_cut_off: float = setting(
        0.1,
        "reject faces with more than this fraction of landmarks outside the photo",
        ge=0.0,
        le=1.0,
    )
    duplicate_distance: int = setting(
        6,
        "perceptual-hash bits (of 64) within which two photos are duplicates; -1 disables",
        ge=-1,
        le=32,
    )
    segment_side: int = setting(
        256, "GrabCut runs at this resolution; the mask is scaled up and feathered", ge=64, le=2048
    )
    grabcut_iterations: int = setting(5, "GrabCut iterations", ge=1, le=20)
    backgrounds: int = setting(
        2,
        "composited background variants per photo (0 = keep only the original background)",
        ge=0,
        le=16,
    )
    keep_original: bool = setting(
        True, "also keep the crop with its original background when backgrounds > 0"
    )
    seed: int = setting(0, "seed of the generated backgrounds (same seed, same images)", ge=0)
    min_images: int = setting(5, "fail unless at least this many photos are usable", ge=1, le=1000)
    max_files: int = setting(
        1000,
        "refuse an input folder or S3 prefix with more files than this, before any is decoded "
        "(a selfie set is a few dozen photos)",
        ge=1,
        le=100_000,
    )
    sheet_rows: int = setting(
        100,
        "the contact sheet shows at most this many photos, rejected ones first "
        "(manifest.json lists every photo)",
        ge=1,
        le=1000,
    )

    def validate(self) -> None:
        if self.backgrounds == 0 and not self.keep_original:
            raise ConfigError(
                "preprocess.keep_original: must be true when preprocess.backgrounds is 0 "
                "(otherwise no image would be written)"
            )
