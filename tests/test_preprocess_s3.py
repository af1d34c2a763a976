"""`avatarforge preprocess s3://...`: hostile keys and big prefixes against a real moto server."""

from __future__ import annotations

import tempfile
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.testing.samples import write_samples

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture
def downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the command's temporary download folder is made in (empty to start)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _upload(bucket: str, keys: list[str], photo: Path) -> None:
    s3 = boto3.client("s3")
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=photo.read_bytes())


def _preprocess(uri: str, out: Path, *options: str):
    result = runner.invoke(app, ["preprocess", uri, str(out), "--backgrounds", "0", *options])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    return "".join(result.output.split())  # rich wraps at the runner's 80 columns


@pytest.mark.parametrize("name", [".", "..", "x/.", "x/.."])
def test_keys_that_name_no_file_are_refused_never_written(tmp_path, s3_bucket, downloads, name):
    photo = write_samples(tmp_path / "photos")[0]
    _upload(s3_bucket, ["u/alice/a.jpg", f"u/alice/{name}"], photo)
    said = _preprocess(f"s3://{s3_bucket}/u/alice/", tmp_path / "out")
    assert f"u/alice/{name}hasnousablefilename" in said
    assert list(downloads.iterdir()) == []  # refused on the listing: nothing downloaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "tmp"]


@pytest.mark.smoke
def test_a_key_too_long_for_a_file_name_is_refused(tmp_path, s3_bucket, downloads):
    photo = write_samples(tmp_path / "photos")[0]
    _upload(s3_bucket, ["u/bob/a.jpg", "u/bob/" + "x" * 300 + ".jpg"], photo)
    said = _preprocess(f"s3://{s3_bucket}/u/bob/", tmp_path / "out")
    assert "filenamelongerthan" in said
    assert list(downloads.iterdir()) == []


def test_a_prefix_with_more_objects_than_max_files_is_refused_before_download(
    tmp_path, s3_bucket, downloads
):
    photo = write_samples(tmp_path / "photos")[0]
    _upload(s3_bucket, [f"u/carol/{i}.jpg" for i in range(3)], photo)
    said = _preprocess(f"s3://{s3_bucket}/u/carol/", tmp_path / "out", "--max-files", "2")
    assert "morethanthelimitof2" in said and "preprocess.max_files" in said
    assert list(downloads.iterdir()) == []
