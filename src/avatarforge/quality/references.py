"""The user's kept photos, the references every generated face is compared with.

They come from the preprocessed dataset the adapter was trained on (``manifest.json``): one
image per kept source photo — the one on its original background where there is one, not the
composites — at most ``limit`` of them, in the manifest's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import AvatarforgeError
from .embedding import FaceEmbedding, embed_face


class QualityError(AvatarforgeError):
    """The evaluation cannot run: no dataset, no usable reference, no such user."""

    status = 400


@dataclass(frozen=True)
class Reference:
    source: str  # the user's original file name
    path: Path  # the kept image in the dataset
    embedding: FaceEmbedding | None  # None: the detector found no face in it


def reference_photos(dataset_dir: Path, limit: int) -> list[tuple[str, Path]]:
    """(source, image path) of up to ``limit`` kept photos, one per source photo."""
    from ..preprocess.manifest import FAILED, KEPT, load_manifest

    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "manifest.json").is_file():
        raise QualityError(
            f"{dataset_dir} is not a preprocessed dataset (no manifest.json): give the folder "
            "`avatarforge preprocess` wrote for this user (--dataset)"
        )
    try:
        manifest = load_manifest(dataset_dir)
    except (ValueError, KeyError, TypeError) as exc:
        raise QualityError(f"{dataset_dir / 'manifest.json'}: unreadable ({exc})") from None
    if manifest.status == FAILED:
        raise QualityError(
            f"{dataset_dir}: preprocessing failed, no kept photos ({manifest.error})"
        )
    chosen: dict[str, Path] = {}
    for item in manifest.items:
        if item.status != KEPT or not item.image:
            continue
        path = dataset_dir / item.image
        if item.source not in chosen or item.background == "original":
            chosen[item.source] = path
    if not chosen:
        raise QualityError(f"{dataset_dir}: the manifest lists no kept photos")
    return list(chosen.items())[:limit]


def embed_references(photos: list[tuple[str, Path]], *, upsample: int = 1) -> list[Reference]:
    """Each photo's face embedding; QualityError when no photo shows a face at all."""
    refs = []
    for source, path in photos:
        if not path.is_file():
            raise QualityError(f"kept photo {source!r} is missing from the dataset: {path}")
        with Image.open(path) as image:
            refs.append(Reference(source, path, embed_face(image, upsample=upsample)))
    if not any(r.embedding is not None for r in refs):
        raise QualityError(
            f"no face found in any of the {len(refs)} kept photos: nothing to compare with"
        )
    return refs
