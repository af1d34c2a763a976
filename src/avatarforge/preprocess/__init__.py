"""Selfie preprocessing: a folder of user photos -> a clean, documented training folder.

intake (decode, orient, size limits) -> duplicates -> faces (largest, landmarks) -> crop
(square, padded) -> segment (person mask) -> backgrounds (composites) -> dataset (files,
manifest.json, contact sheet). Everything but :mod:`.dataset` is pure functions on arrays.
"""

from .config import NotEnoughPhotosError, PreprocessConfig, PreprocessError
from .dataset import preprocess_dir
from .faces import Face, detect_faces, iou, largest_face
from .intake import Photo, Rejected, load_photo
from .manifest import Manifest, ManifestItem, load_manifest
from .segment import GrabCutSegmenter, Segmenter

__all__ = [
    "Face",
    "GrabCutSegmenter",
    "Manifest",
    "ManifestItem",
    "NotEnoughPhotosError",
    "Photo",
    "PreprocessConfig",
    "PreprocessError",
    "Rejected",
    "Segmenter",
    "detect_faces",
    "iou",
    "largest_face",
    "load_manifest",
    "load_photo",
    "preprocess_dir",
]
