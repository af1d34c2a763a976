"""The preprocess step end to end on the real sample photos and the hostile files."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.preprocess import (
    NotEnoughPhotosError,
    PreprocessConfig,
    PreprocessError,
    detect_faces,
    iou,
    load_manifest,
    preprocess_dir,
)
from avatarforge.preprocess import dataset as dataset_module
from avatarforge.testing.samples import HOSTILE, expected_faces, upside_down_upright
from avatarforge.train.data import read_dataset
from avatarforge.train.errors import TrainingError

SMALL = PreprocessConfig(size=128, backgrounds=1, min_images=1)  # fast runs of the hostile set


def _tree_hash(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_every_sample_photo_is_kept_with_one_item_per_image(sample_photos, sample_manifest):
    config = PreprocessConfig()
    per_photo = config.backgrounds + int(config.keep_original)
    sources = sorted(p.name for p in sample_photos.iterdir())
    assert sample_manifest.rejected == []
    assert sample_manifest.kept_sources == sources
    assert len(sample_manifest.kept) == per_photo * len(sources)
    for source in sources:
        items = [i for i in sample_manifest.kept if i.source == source]
        kinds = [i.background for i in items]
        assert kinds[0] == "original" and set(kinds[1:]) <= {"solid", "gradient", "noise"}
        assert len({i.image for i in items}) == per_photo and len({i.mask for i in items}) == 1


def test_outputs_are_square_rgb_images_with_grey_masks(sample_dataset, sample_manifest):
    for item in sample_manifest.kept:
        with Image.open(sample_dataset / item.image) as img:
            assert (img.mode, img.size) == ("RGB", (512, 512))
        with Image.open(sample_dataset / item.mask) as mask:
            assert (mask.mode, mask.size) == ("L", (512, 512))
    assert (sample_dataset / "contact_sheet.png").stat().st_size > 10_000
    saved = PreprocessConfig.load(sample_dataset / "preprocess_config.json")
    assert saved == PreprocessConfig()


def test_manifest_file_matches_the_contract(sample_dataset, sample_manifest):
    data = json.loads((sample_dataset / "manifest.json").read_text())
    assert data["version"] == 1 and data["config"] == PreprocessConfig().to_dict()
    assert data["kept"] == len(sample_manifest.kept) and data["rejected"] == 0
    item = data["items"][0]
    assert {"source", "status", "reason", "image", "mask", "face_box", "scores"} <= set(item)
    expected = hashlib.sha256((sample_dataset / "manifest.json").read_bytes()).hexdigest()
    assert sample_manifest.content_hash == expected
    assert sample_manifest.image_paths()[0] == sample_dataset / sample_manifest.kept[0]["image"]


def test_face_boxes_match_hand_checked_boxes(sample_manifest):
    boxes = {i.source: i.face_box for i in sample_manifest.kept}
    # Covers the original, a mirror, EXIF-rotated JPEG, HEIC crop, small face on a big canvas.
    for name, expected in expected_faces().items():
        assert iou(tuple(boxes[name]), expected) >= 0.7, name


def test_largest_face_wins_over_a_pasted_smaller_one(sample_manifest):
    item = next(i for i in sample_manifest.kept if i.source == "astronaut_two_faces.jpg")
    assert item.scores["faces"] >= 2
    assert iou(tuple(item.face_box), (150, 58, 240, 152)) >= 0.7  # the real face, moved by crop


def test_masks_cover_the_face_and_not_the_background_corners(sample_dataset, sample_manifest):
    for item in sample_manifest.kept:
        if item.background != "original":
            continue
        mask = np.asarray(Image.open(sample_dataset / item.mask), dtype=np.float32) / 255
        cx0, cy0, cx1, _ = item.crop_box
        scale = 512 / (cx1 - cx0)
        x0, y0, x1, y1 = (
            round((v - o) * scale) for v, o in zip(item.face_box, (cx0, cy0, cx0, cy0), strict=True)
        )
        inner = mask[y0 + (y1 - y0) // 8 : y1 - (y1 - y0) // 8, x0 + (x1 - x0) // 8 : x1]
        assert inner.mean() > 0.95, item.source
        c = 512 // 8
        assert mask[:c, :c].mean() < 0.1 and mask[:c, -c:].mean() < 0.1, item.source


def test_composites_replace_the_background(sample_dataset, sample_manifest):
    original = next(i for i in sample_manifest.kept if i.background == "original")
    variant = next(
        i for i in sample_manifest.kept if i.source == original.source and i is not original
    )
    a = np.asarray(Image.open(sample_dataset / original.image), dtype=np.int16)
    b = np.asarray(Image.open(sample_dataset / variant.image), dtype=np.int16)
    mask = np.asarray(Image.open(sample_dataset / original.mask))
    assert np.abs(a - b)[mask == 255].mean() < 1  # the person is the same pixels
    assert np.abs(a - b)[mask == 0].mean() > 10  # the wall is gone


def test_hostile_files_are_rejected_with_their_reasons(tmp_path, hostile_photos, sample_photos):
    src = tmp_path / "in"
    shutil.copytree(hostile_photos, src)
    shutil.copy(sample_photos / "astronaut.jpg", src)
    before = _tree_hash(src)
    manifest = preprocess_dir(src, tmp_path / "out", SMALL)
    assert _tree_hash(src) == before  # the user's originals are never modified
    by_source = {i.source: i for i in manifest.items}
    for name, reason in HOSTILE.items():
        item = by_source[name]
        if reason is None:
            assert item.status == "kept", name
        else:
            assert item.status == "rejected" and reason in item.reason, (name, item.reason)
            assert item.image is None and item.mask is None
    assert by_source["astronaut.jpg"].status == "kept"
    assert set(manifest.kept_sources) == {"astronaut.jpg", "upside_down_exif.jpg"}
    assert by_source["small_face.jpg"].face_box is not None  # found, but too small to use


def test_upside_down_exif_photo_is_turned_upright(tmp_path, hostile_photos):
    manifest = preprocess_dir(hostile_photos, tmp_path / "out", SMALL)
    item = next(i for i in manifest.kept if i.source == "upside_down_exif.jpg")
    upright = detect_faces(upside_down_upright())[0]
    assert iou(tuple(item.face_box), upright.box) >= 0.9
    face_row = (item.face_box[1] + item.face_box[3]) / 2
    assert face_row < 256  # in the upright photo the face is in the upper half


def test_too_few_usable_photos_is_a_clear_error_after_writing(tmp_path, hostile_photos):
    with pytest.raises(NotEnoughPhotosError, match=r"only 1 usable photo.*at least 5") as err:
        preprocess_dir(hostile_photos, tmp_path / "out", PreprocessConfig(size=128))
    assert "no_face.jpg: no face found" in str(err.value)
    assert load_manifest(tmp_path / "out").rejected  # the user can still see why


def test_output_folder_safety_and_rerun(tmp_path, hostile_photos):
    with pytest.raises(PreprocessError, match="must not be or contain"):
        preprocess_dir(hostile_photos, hostile_photos, SMALL)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("x")
    with pytest.raises(PreprocessError, match="not empty"):
        preprocess_dir(hostile_photos, foreign, SMALL)
    out = tmp_path / "out"
    preprocess_dir(hostile_photos, out, SMALL)
    (out / "images" / "stale.png").write_bytes(b"old")
    manifest = preprocess_dir(
        hostile_photos, out, PreprocessConfig(size=64, backgrounds=0, min_images=1)
    )
    assert not (out / "images" / "stale.png").exists()
    assert [p.name for p in (out / "images").iterdir()] == ["upside_down_exif.png"]
    assert Image.open(out / manifest.kept[0].image).size == (64, 64)


def test_a_custom_segmenter_plugs_in(tmp_path, hostile_photos):
    class Everything:
        def mask(self, image, face):
            return np.full(image.shape[:2], 255, np.uint8)

    manifest = preprocess_dir(hostile_photos, tmp_path / "out", SMALL, segmenter=Everything())
    mask = np.asarray(Image.open(tmp_path / "out" / manifest.kept[0].mask))
    assert mask.min() == 0 and mask.max() == 255  # only padding above the chin is cleared


runner = CliRunner()


def test_cli_samples_and_preprocess(tmp_path):
    result = runner.invoke(app, ["samples", str(tmp_path / "in"), "--hostile"])
    assert result.exit_code == 0, result.output
    for extra in (p for p in (tmp_path / "in").iterdir() if p.name.startswith("astronaut_")):
        extra.unlink()  # keep the run short: astronaut.jpg plus the hostile files
    args = ["preprocess", str(tmp_path / "in"), str(tmp_path / "out"), "--size", "128"]
    result = runner.invoke(app, [*args, "--backgrounds", "0", "--min-images", "2"])
    assert result.exit_code == 0, result.output
    text = "".join(result.output.split())  # rich wraps lines at the runner's 80 columns
    assert "nofacefound" in text and "contact_sheet.png" in text
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2
    result = runner.invoke(app, [*args, "--min-images", "5"])
    assert result.exit_code == 1 and "only2usable" in "".join(result.output.split())
    assert "Traceback" not in result.output
    result = runner.invoke(app, [*args, "--detector", "mtcnn"])
    assert result.exit_code == 1 and "preprocess.detector" in result.output


# --- failed runs, big folders (issue 13) ----------------------------------------------------


def test_a_failed_run_leaves_nothing_training_accepts(tmp_path, hostile_photos):
    out = tmp_path / "out"
    preprocess_dir(hostile_photos, out, SMALL)  # a good dataset first, in the same folder
    assert read_dataset(out).images
    strict = PreprocessConfig(size=128, backgrounds=1, min_images=5)
    with pytest.raises(NotEnoughPhotosError):
        preprocess_dir(hostile_photos, out, strict)
    with pytest.raises(TrainingError, match=r"preprocessing failed.*only 1 usable photo"):
        read_dataset(out)
    result = runner.invoke(app, ["train", str(out), "--user", "alice"])
    assert result.exit_code == 1 and "preprocessing failed" in result.output, result.output
    manifest = load_manifest(out)  # the user still sees why, on the sheet and in the manifest
    assert manifest.status == "failed" and "only 1 usable photo" in manifest.error
    assert manifest.rejected and (out / "contact_sheet.png").stat().st_size > 1000
    assert not (out / "images").exists() and not (out / "masks").exists()  # nothing published
    assert all(i.image is None for i in manifest.items)


def test_an_interrupted_run_is_not_a_dataset_and_can_be_rerun(tmp_path, hostile_photos):
    out = tmp_path / "out"

    class Interrupted(BaseException):  # as Ctrl-C is: not caught as one photo's failure
        pass

    def stop(*args, **kwargs):
        raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset_module, "process_photo", stop)
        with pytest.raises(Interrupted):
            preprocess_dir(hostile_photos, out, SMALL)
    with pytest.raises(TrainingError, match="preprocessing did not finish"):
        read_dataset(out)
    assert preprocess_dir(hostile_photos, out, SMALL).kept  # the folder is still ours to reuse


def test_training_refuses_a_failed_manifest_of_older_code(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    kept = {"source": "a.jpg", "status": "kept", "image": "images/a.png"}
    rejected = {"source": "b.jpg", "status": "rejected", "reason": "no face found"}
    old = {"version": 1, "config": {"min_images": 5}, "items": [kept, rejected]}
    (tmp_path / "manifest.json").write_text(json.dumps(old))  # written before "status" existed
    with pytest.raises(
        TrainingError, match=r"preprocessing failed.*only 1 usable photo.*min_images is 5"
    ):
        read_dataset(tmp_path)
    old["config"]["min_images"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert [p.name for p in read_dataset(tmp_path).images] == ["a.png"]


def test_more_files_than_max_files_is_refused_before_anything_is_decoded(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.jpg").write_bytes(b"x")
    decoded = []
    monkeypatch.setattr(dataset_module, "load_photo", lambda *a, **k: decoded.append(a))
    config = PreprocessConfig(max_files=5, min_images=1)
    with pytest.raises(PreprocessError, match=r"more than 5 files.*preprocess\.max_files"):
        preprocess_dir(src, tmp_path / "out", config)
    assert decoded == [] and not (tmp_path / "out").exists()
    result = runner.invoke(app, ["preprocess", str(src), str(tmp_path / "out"), "--max-files", "5"])
    assert result.exit_code == 1 and "--max-files" in "".join(result.output.split())


def test_the_contact_sheet_is_capped_at_sheet_rows(tmp_path, hostile_photos):
    src = tmp_path / "in"
    shutil.copytree(hostile_photos, src)
    for i in range(40):
        (src / f"junk_{i:02}.txt").write_text("not a photo")
    config = PreprocessConfig(size=64, backgrounds=0, min_images=1, sheet_rows=10)
    manifest = preprocess_dir(src, tmp_path / "out", config)
    photos = len({i.source for i in manifest.items})
    assert manifest.not_on_sheet == photos - 10
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["not_on_sheet"] == photos - 10 and len(data["items"]) == photos
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.height < 20 + 11 * (160 + 14 + 6)  # ten rows, not fifty


def test_photos_larger_than_work_side_keep_source_coordinates(tmp_path):
    from avatarforge.testing.samples import ASTRONAUT_FACE, astronaut

    src = tmp_path / "in"
    src.mkdir()
    astronaut().resize((2048, 2048), Image.Resampling.LANCZOS).save(src / "big.png")
    config = PreprocessConfig(size=128, backgrounds=0, min_images=1, work_side=1024)
    item = preprocess_dir(src, tmp_path / "out", config).kept[0]
    assert iou(tuple(item.face_box), tuple(4 * v for v in ASTRONAUT_FACE)) >= 0.7
    assert item.scores["face_px"] > 300  # source pixels, as min_face_px is
