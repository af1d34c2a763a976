"""gen_args as other clients write it (aliases), and errors that say what to change."""

from __future__ import annotations

import json

import pytest

from avatarforge.generate import GenArgs
from avatarforge.preprocess import NotEnoughPhotosError, PreprocessConfig, preprocess_dir
from avatarforge.settings import ConfigError


def test_the_published_samples_and_diffusers_names_are_accepted():
    # the published sample's client: gen_args = json.dumps(dict(num_inference_steps=50, ...))
    sample = json.dumps({"num_inference_steps": 50, "guidance_scale": 10, "seed": 1})
    assert GenArgs.parse(sample) == GenArgs(steps=50, guidance_scale=10, seed=1)
    diffusers = {"num_inference_steps": 20, "num_images_per_prompt": 2, "height": 64}
    assert GenArgs.parse(diffusers) == GenArgs(steps=20, num_images=2, height=64)
    assert GenArgs.parse({"cfg_scale": 5.0}).guidance_scale == 5.0  # AUTOMATIC1111's API
    assert GenArgs.parse({"cfg": 4.0, "sampler": "euler"}) == GenArgs(
        guidance_scale=4.0, scheduler="euler"
    )  # ComfyUI's KSampler
    # an alias is checked like its field, and the error names the field
    with pytest.raises(ConfigError, match=r"^gen_args\.steps: must be <= 150 \(got 500\)"):
        GenArgs.parse({"num_inference_steps": 500})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"num_inference_step": 3},
            "num_inference_step: did you mean num_inference_steps (= steps)?",
        ),
        ({"stpes": 3}, "stpes: did you mean steps?"),
        ({"guidance": 3}, "guidance: did you mean guidance_scale?"),
        ({"num_image": 2}, "num_image: did you mean num_images?"),
        ({"sead": 1, "widht": 64}, "sead: did you mean seed?; widht: did you mean width?"),
        ({"colour": "red"}, "unknown field(s) colour (fields: steps, guidance_scale, seed"),
    ],
)
def test_an_unknown_field_gets_the_closest_name(data, message):
    with pytest.raises(ConfigError) as err:
        GenArgs.parse(json.dumps(data))
    assert str(err.value).startswith("gen_args: unknown field(s) ")
    assert message in str(err.value)


def test_a_field_given_twice_or_in_the_wrong_place_is_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="'steps' and 'num_inference_steps' both set steps"):
        GenArgs.parse({"steps": 20, "num_inference_steps": 20})
    with pytest.raises(ConfigError, match="send it as the negative_prompt input"):
        GenArgs.parse({"negative_prompt": "blurry"})
    with pytest.raises(ConfigError, match="send it as the prompt input"):
        GenArgs.parse({"prompt": "a photo"})
    with pytest.raises(ConfigError, match="give seed"):
        GenArgs.parse({"generator": 1})


def test_from_dict_takes_the_aliases_too_and_round_trips():
    args = GenArgs.from_dict({"num_inference_steps": 4, "seed": 9})
    assert args == GenArgs(steps=4, seed=9)
    assert GenArgs.from_dict(args.to_dict()) == args


def test_too_few_photos_names_the_settings_that_decide_it(tmp_path, hostile_photos):
    config = PreprocessConfig(size=128, backgrounds=0)
    with pytest.raises(NotEnoughPhotosError) as err:
        preprocess_dir(hostile_photos, tmp_path / "out", config)
    message = str(err.value)
    print(message)
    assert "need at least 5 (preprocess.min_images, --min-images)" in message
    # each kind of rejection in this set, with the setting (and flag) that decides it
    assert "upside_down_exif_copy.png: duplicate of" in message
    assert "preprocess.duplicate_distance (--duplicate-distance, now 6;" in message
    assert "preprocess.min_face_px (--min-face-px, now 64;" in message
    assert "preprocess.min_side (--min-side, now 256;" in message
    assert "preprocess.detector (--detector, now 'hog';" in message
    # the settings it names are the CLI's flags
    from typer.testing import CliRunner

    from avatarforge.cli import app

    help_text = CliRunner().invoke(app, ["preprocess", "--help"]).output
    for flag in ("--min-images", "--duplicate-distance", "--min-face-px", "--min-side"):
        assert flag in help_text
