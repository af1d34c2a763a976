"""`avatarforge eval`: generate the fixed prompt set with a user's adapter and score it.

The images are made with diffusers on this machine (the reference path, which the served
model reproduces pixel for pixel), then each is scored against the user's kept photos
(:mod:`.metric`). What it writes, in one folder replaced whole::

    report.json   scores, every image's prompt, seed and distance, what it measures (or not)
    grid.png      the images with their scores written on them, references on top
    images/       NN-identity.png / NN-leakage.png
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .config import EvalConfig
from .embedding import embed_face
from .grid import draw_grid
from .metric import ImageScore, score_image, summarize
from .prompts import NEGATIVE_PROMPT, EvalPrompt, prompt_set
from .references import Reference, embed_references, reference_photos
from .report import GRID_FILE, EvalReport, notes_for, random_base_reason

ADAPTER_NAME = "quality_eval"  # not "eval": a ModuleDict key may not shadow nn.Module.eval

Progress = Callable[[int, int, ImageScore], None]


@dataclass
class EvalResult:
    report: EvalReport
    out_dir: Path
    report_path: Path
    grid_path: Path
    images: list[Path]


def score_images(
    generated: Sequence[tuple[EvalPrompt, Image.Image]],
    references: Sequence[Reference],
    config: EvalConfig,
    on_progress: Progress | None = None,
) -> list[ImageScore]:
    """Score each (prompt, image) against the references' embeddings."""
    vectors = [r.embedding.vector for r in references if r.embedding is not None]
    scores = []
    for i, (prompt, image) in enumerate(generated):
        face = embed_face(image, upsample=config.upsample)
        score = score_image(
            prompt.kind,
            prompt.prompt,
            prompt.seed,
            face.vector if face is not None else None,
            vectors,
            config.threshold,
            file=f"images/{i:02d}-{prompt.kind}.png",
        )
        scores.append(score)
        if on_progress is not None:
            on_progress(i + 1, len(generated), score)
    return scores


def build_report(
    user: str,
    adapter_dir: Path,
    meta,
    references: Sequence[Reference],
    scores: Sequence[ImageScore],
    config: EvalConfig,
) -> EvalReport:
    summary = summarize(scores)
    why = random_base_reason(meta.base_id)
    return EvalReport(
        user=user,
        adapter=str(adapter_dir),
        base_id=meta.base_id,
        base_hash=meta.base_hash,
        token=meta.token,
        threshold=config.threshold,
        measures_nothing=why is not None,
        why=why,
        references=[
            {"source": r.source, "image": str(r.path), "face": r.embedding is not None}
            for r in references
        ],
        scores=summary,
        images=[s.to_dict() for s in scores],
        config=config.to_dict(),
        notes=notes_for(summary, list(scores)),
    )


def generate_set(
    pipe, prompts: Sequence[EvalPrompt], config: EvalConfig, on_image: Callable | None = None
) -> list[Image.Image]:
    """One image per prompt of the set, with its seed, at the configured size and steps."""
    from ..generate import GenArgs, generate_images

    images = []
    for i, prompt in enumerate(prompts):
        args = GenArgs(
            steps=config.steps,
            guidance_scale=config.guidance_scale,
            seed=prompt.seed,
            height=config.size,
            width=config.size,
            scheduler=config.scheduler,
        )
        images.append(generate_images(pipe, prompt.prompt, NEGATIVE_PROMPT, args)[0])
        if on_image is not None:
            on_image(i + 1, len(prompts))
    return images


def evaluate(
    user: str,
    adapter_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    config: EvalConfig | None = None,
    *,
    base=None,
    pipe=None,
    on_image: Callable[[int, int], None] | None = None,
    on_score: Progress | None = None,
) -> EvalResult:
    """Evaluate ``user``'s adapter against the kept photos of ``dataset_dir`` into ``out_dir``.

    ``base``: the BaseInfo the adapter was trained on (default: found from its metadata).
    ``pipe``: a pipeline of that base without adapters, to reuse (the adapter is loaded into it
    and removed again); default: a new one. ``on_image(done, total)`` follows generation,
    ``on_score(done, total, score)`` scoring.
    """
    from ..adapter import base_config_for, load_adapter, read_adapter, unload_adapter
    from ..base.config import resolve_base
    from ..base.pipeline import load_pipeline
    from ..fsutil import replace_dir

    config = config or EvalConfig()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    meta = read_adapter(adapter_dir)
    references = embed_references(reference_photos(Path(dataset_dir), config.max_references))
    base = base or resolve_base(base_config_for(meta))
    own_pipe = pipe is None
    if own_pipe:
        pipe = load_pipeline(base, device=config.device or None)
    load_adapter(pipe, adapter_dir, base, ADAPTER_NAME)
    try:
        prompts = prompt_set(meta.token, config.prompts, config.seeds, config.seed)
        images = generate_set(pipe, prompts, config, on_image)
    finally:
        if not own_pipe:
            unload_adapter(pipe, ADAPTER_NAME)
    scores = score_images(list(zip(prompts, images, strict=True)), references, config, on_score)
    report = build_report(user, adapter_dir, meta, references, scores, config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep it from everyone else
        (tmp / "images").mkdir()
        for image, score in zip(images, scores, strict=True):
            image.save(tmp / score.file)
        report.write(tmp)
        draw_grid(report, images, references).save(tmp / GRID_FILE)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return EvalResult(
        report=report,
        out_dir=out_dir,
        report_path=out_dir / "report.json",
        grid_path=out_dir / GRID_FILE,
        images=[out_dir / s.file for s in scores],
    )
