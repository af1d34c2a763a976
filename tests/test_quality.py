"""The avatar quality metric on real photos, and `avatarforge eval` on the tiny base.

Real portraits that ship offline: skimage's astronaut (Eileen Collins) and matplotlib's Grace
Hopper, plus the sample photos (variants of the astronaut: mirrored, tilted, cropped, recoloured,
greyscale, re-encoded). No second real photo of the same person ships offline, so "the same
person" is the astronaut in those variants; the mirror image is the hardest (faces are not
symmetric). The assertions are against dlib's 0.6, so a broken embedding or alignment fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.quality import (
    IDENTITY,
    LEAKAGE,
    THRESHOLD,
    EvalConfig,
    distance,
    embed_face,
    evaluate,
    random_base_reason,
    summarize,
)
from avatarforge.quality.prompts import TEMPLATES, EvalPrompt, prompt_set
from avatarforge.quality.references import QualityError, embed_references, reference_photos
from avatarforge.quality.run import score_images
from avatarforge.testing.samples import astronaut, write_samples

# The variants of the astronaut compared with the original: each a different photo to dlib.
SAME = (
    "astronaut_mirror.jpg",
    "astronaut_tilt_left.jpg",
    "astronaut_warm_close.jpg",
    "astronaut_grey.png",
    "astronaut_far_left.jpg",
    "astronaut_cool.webp",
    "astronaut_exif_rotated.jpg",
)


def hopper() -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Image.Image]:
    folder = tmp_path_factory.mktemp("samples")
    write_samples(folder)
    out = {"astronaut": astronaut(), "hopper": hopper()}
    for name in SAME:
        with Image.open(folder / name) as image:
            out[name] = ImageOps.exif_transpose(image).convert("RGB")
    return out


@pytest.fixture(scope="module")
def embeddings(photos) -> dict[str, np.ndarray]:
    found = {name: embed_face(image) for name, image in photos.items()}
    missing = [name for name, e in found.items() if e is None]
    assert not missing, f"no face found in {missing}"
    return {name: e.vector for name, e in found.items()}


def test_embedding_is_128_numbers_of_the_largest_face(photos):
    face = embed_face(photos["astronaut"])
    assert face.vector.shape == (128,)
    x0, y0, x1, y1 = face.box
    assert 150 < (x0 + x1) / 2 < 300 and 60 < (y0 + y1) / 2 < 200  # her face, not the flag


def test_the_same_person_is_close(embeddings):
    distances = {name: distance(embeddings["astronaut"], embeddings[name]) for name in SAME}
    print("astronaut vs her variants:", {k: round(v, 3) for k, v in distances.items()})
    assert all(d < THRESHOLD for d in distances.values()), distances


def test_different_people_are_far(embeddings):
    apart = {
        name: distance(embeddings["hopper"], embeddings[name]) for name in ("astronaut", *SAME)
    }
    print("Grace Hopper vs the astronaut's photos:", {k: round(v, 3) for k, v in apart.items()})
    assert all(d > THRESHOLD for d in apart.values()), apart
    same = [distance(embeddings["astronaut"], embeddings[name]) for name in SAME]
    assert max(same) < min(apart.values())  # the two people separate completely


def test_no_face_no_embedding():
    from skimage import data

    assert embed_face(Image.fromarray(data.chelsea())) is None  # a cat
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    assert embed_face(noise) is None


def _refs(photos, names):
    from avatarforge.quality.embedding import embed_face as embed
    from avatarforge.quality.references import Reference

    return [Reference(n, Path(n), embed(photos[n])) for n in names]


def test_identity_and_leakage_scores_on_real_photos(photos):
    """Real photos in place of generated ones: the astronaut's variants as what the token
    prompts made (the user), Grace Hopper as a class-prompt face (someone else), and once the
    astronaut as a class-prompt face (the leak the metric exists to catch)."""
    references = _refs(photos, ["astronaut", "astronaut_tilt_left.jpg", "astronaut_grey.png"])
    generated = [
        (EvalPrompt(IDENTITY, "a photo of <<TOK>> person", 0), photos["astronaut_mirror.jpg"]),
        (EvalPrompt(IDENTITY, "a photo of <<TOK>> person", 1), photos["astronaut_cool.webp"]),
        (EvalPrompt(IDENTITY, "a photo of <<TOK>> person", 2), Image.new("RGB", (128, 128))),
        (EvalPrompt(LEAKAGE, "a photo of person", 0), photos["hopper"]),
        (EvalPrompt(LEAKAGE, "a photo of person", 1), photos["astronaut_far_left.jpg"]),
    ]
    scores = score_images(generated, references, EvalConfig())
    assert [s.face for s in scores] == [True, True, False, True, True]
    assert [s.match for s in scores] == [True, True, None, False, True]
    assert scores[0].distance < THRESHOLD < scores[3].distance
    summary = summarize(scores)
    assert summary["face_found_rate"] == 0.8
    assert summary["identity"]["match_rate"] == round(2 / 3, 4)  # no face: a miss
    assert summary["identity"]["match_rate_of_faces"] == 1.0
    assert summary["leakage"]["leak_rate"] == 0.5  # the astronaut leaked into a class image
    assert summary["leakage"]["min_distance"] < THRESHOLD
    clean = summarize([s for s in scores if s.prompt != "a photo of person" or s.seed == 0])
    assert clean["leakage"]["leak_rate"] == 0.0


def test_a_stricter_threshold_rejects_more(photos):
    references = _refs(photos, ["astronaut"])
    mirror = [(EvalPrompt(IDENTITY, "p", 0), photos["astronaut_mirror.jpg"])]
    d = score_images(mirror, references, EvalConfig())[0].distance
    assert score_images(mirror, references, EvalConfig(threshold=d - 0.01))[0].match is False
    assert score_images(mirror, references, EvalConfig(threshold=d + 0.01))[0].match is True


def test_prompt_set_is_fixed_and_paired():
    a = prompt_set("<<TOK>>", 3, 2, seed=5)
    assert a == prompt_set("<<TOK>>", 3, 2, seed=5)
    assert len(a) == 12
    for identity, leakage in zip(a[::2], a[1::2], strict=True):
        assert identity.kind == IDENTITY and leakage.kind == LEAKAGE
        assert identity.seed == leakage.seed
        assert "<<TOK>> person" in identity.prompt and "<<TOK>>" not in leakage.prompt
        assert identity.prompt.replace("<<TOK>> ", "") == leakage.prompt
    assert [p.seed for p in a[:4]] == [5, 5, 6, 6]
    with pytest.raises(ValueError):
        prompt_set("<<TOK>>", len(TEMPLATES) + 1, 1)


def test_random_bases_measure_nothing():
    assert "measures nothing" in random_base_reason("avatarforge/tiny-sd21@seed0")
    assert "random weights" in random_base_reason("avatarforge/full-sd21@seed3")
    assert random_base_reason("stabilityai/stable-diffusion-2-1-base") is None


def test_references_one_per_source_original_background_first(tmp_path):
    from avatarforge.testing.datasets import write_dataset

    dataset = write_dataset(tmp_path / "ds", count=3)
    manifest = json.loads((dataset / "manifest.json").read_text())
    first = manifest["items"][0]
    composite = {**first, "image": "images/astronaut-1.png", "background": "noise"}
    manifest["items"].insert(0, composite)  # a composite of the first photo, listed first
    manifest["items"][1]["background"] = "original"
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    chosen = reference_photos(dataset, limit=10)
    assert [s for s, _ in chosen] == ["astronaut-0.jpg", "astronaut-1.jpg", "astronaut-2.jpg"]
    assert chosen[0][1].name == "astronaut-0.png"  # the original background, not the composite
    assert len(reference_photos(dataset, limit=2)) == 2
    refs = embed_references(chosen)
    assert all(r.embedding is not None for r in refs)


def test_references_errors(tmp_path):
    with pytest.raises(QualityError, match="not a preprocessed dataset"):
        reference_photos(tmp_path, 5)
    from avatarforge.testing.datasets import write_dataset

    dataset = write_dataset(tmp_path / "ds", count=2)
    for image in (dataset / "images").iterdir():
        Image.new("RGB", (512, 512), (90, 90, 90)).save(image)
    with pytest.raises(QualityError, match="no face found in any of the 2 kept photos"):
        embed_references(reference_photos(dataset, 5))


SMALL = {"prompts": 2, "seeds": 1, "steps": 2, "size": 64, "max_references": 3}


@pytest.mark.slow
def test_eval_on_the_tiny_base_says_it_measures_nothing(trained_adapter, train_dataset, tmp_path):
    result = evaluate(
        "alice", trained_adapter, train_dataset, tmp_path / "eval", EvalConfig(**SMALL)
    )
    report = json.loads(result.report_path.read_text())
    assert report["measures_nothing"] is True
    assert report["why"].startswith("this measures nothing: the base avatarforge/tiny-sd21")
    assert report["scores"]["images"] == 4 and len(report["images"]) == 4
    assert [i["kind"] for i in report["images"]] == [IDENTITY, LEAKAGE] * 2
    assert report["threshold"] == THRESHOLD and report["config"]["size"] == 64
    assert all(r["face"] for r in report["references"])  # real photos: faces found
    assert len(report["references"]) == 3
    for row in report["images"]:
        assert Image.open(tmp_path / "eval" / row["file"]).size == (64, 64)
    grid = Image.open(result.grid_path)
    assert grid.width >= 3 * 160 and grid.height >= 3 * 160  # references + 2 prompt rows
    # the same settings make the same images: the prompt set is seeded
    again = evaluate(
        "alice", trained_adapter, train_dataset, tmp_path / "eval2", EvalConfig(**SMALL)
    )
    for a, b in zip(result.images, again.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


runner = CliRunner()


def test_eval_cli(trained_adapter, train_dataset, tiny_base, tmp_path):
    out = tmp_path / "eval"
    # --base: where the base is (an imported base's adapter records its id, not its folder)
    args = ["eval", "alice", "--adapter", str(trained_adapter), "--dataset", str(train_dataset),
            "--out", str(out), "--prompts", "1", "--seeds", "1", "--steps", "2",
            "--size", "64", "--base", str(tiny_base.path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "this measures nothing" in result.output
    assert "face found" in result.output and "leakage" in result.output
    assert (out / "report.json").is_file() and (out / "grid.png").is_file()


def test_eval_cli_unknown_user_and_bad_options(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATARFORGE_BUILD", str(tmp_path))
    (tmp_path / "users" / "alice" / "adapter").mkdir(parents=True)
    result = runner.invoke(app, ["eval", "alicee"])
    assert result.exit_code == 1
    assert "unknown user 'alicee'" in result.output and "did you mean 'alice'?" in result.output
    result = runner.invoke(app, ["eval", "alice"])
    assert result.exit_code == 1 and "no dataset for 'alice'" in result.output
    result = runner.invoke(app, ["eval", "alice", "--dataset", str(tmp_path), "--size", "100"])
    assert result.exit_code == 1 and "eval.size: must be a multiple of 8" in result.output
    result = runner.invoke(app, ["eval", "alice", "--dataset", str(tmp_path), "--base", "a/b"])
    assert result.exit_code == 1 and "`avatarforge base import a/b`" in result.output
