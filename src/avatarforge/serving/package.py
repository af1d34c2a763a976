"""`avatarforge package`: one user's Triton model as the tarball SageMaker MME loads.

``<user>.tar.gz`` holds the folder ``<user>/`` (SageMaker untars into ``.../model`` and Triton
finds the model folder there)::

    <user>/config.pbtxt                   rendered from the schema; base id + hash, no paths
    <user>/1/model.py                     triton_models/user.py (a thin BLS forwarder)
    <user>/1/avatarforge_bootstrap.py     serving/bootstrap.py: start-up on a bare Triton image
    <user>/1/shared_base.json             the shared base's config (the instance adds its env)
    <user>/1/adapter/                     LoRA weights + metadata

published with its sha256: locally in the file's extended attribute, set before its one
rename (and in ``<user>.tar.gz.sha256`` beside it, for people and ``sha256sum -c``); in S3 in
the same PUT (:func:`avatarforge.storage.publish`). What serves a package accepts exactly this
and nothing else (:mod:`.package_check`). Everything comes from the installed package
(``importlib.resources``), so a wheel packages as well as a checkout. It is checked before it
is written, and its bytes are reproducible.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .. import storage
from ..adapter import METADATA_FILE, WEIGHTS_FILE, read_adapter
from ..base.identity import BaseInfo, check_same_base
from ..names import InvalidNameError, check_user_id
from ..paths import build_dir
from ..safe_tar import safe_extract, write_reproducible_tar
from . import bootstrap, schema, triton_models
from .config import ServingConfig
from .package_check import (
    BOOTSTRAP_FILE,
    VERSION_DIR,
    PackageError,
    PackageRefusedError,
    check_package,
    checksum_path,
    write_checksum,
)
from .triton_config import parse_pbtxt, sd_base_config, to_pbtxt, user_model_config


def check_user_name(user: str) -> str:
    try:
        return check_user_id(user)
    except InvalidNameError as exc:
        raise PackageError(str(exc)) from None


def _check_config(text: str, user: str) -> None:
    config = parse_pbtxt(text)
    names = [i["name"] for i in config.get("input", [])]
    if config.get("name") != user or names != [s.name for s in schema.INPUTS]:
        raise PackageError(f"rendered config does not match the schema: {config}")


def package_user(
    user: str,
    adapter_dir: Path,
    out_dir: Path | None = None,
    *,
    base: BaseInfo,
    serving: ServingConfig | None = None,
) -> Path:
    """Write ``out_dir/<user>.tar.gz`` (default build/package/) and return its path.

    Of ``serving`` only ``max_batch_size`` is packaged: every other setting is the instance's
    (:meth:`.ServingConfig.from_env`)."""
    check_user_name(user)
    meta = read_adapter(adapter_dir)
    check_same_base(meta.to_dict(), base)  # an adapter only works on its own base
    serving = serving or ServingConfig()
    text = to_pbtxt(user_model_config(user, base.base_id, base.content_hash, serving))
    _check_config(text, user)
    shared_base = sd_base_config(base.base_id, base.content_hash)
    out_dir = Path(out_dir or build_dir() / "package")
    with tempfile.TemporaryDirectory(prefix=f".{user}-", dir=_mkdir(out_dir)) as tmp:
        model = Path(tmp) / user
        version = model / VERSION_DIR
        (version / bootstrap.ADAPTER_SUBDIR).mkdir(parents=True)
        (model / "config.pbtxt").write_text(text)
        (version / "model.py").write_bytes(triton_models.source("user.py"))
        (version / BOOTSTRAP_FILE).write_bytes(triton_models.bootstrap_source())
        (version / bootstrap.SHARED_BASE_FILE).write_text(
            json.dumps(shared_base, indent=1, sort_keys=True) + "\n"
        )
        for name in (WEIGHTS_FILE, METADATA_FILE):  # only what serving reads
            shutil.copyfile(Path(adapter_dir) / name, version / bootstrap.ADAPTER_SUBDIR / name)
        staged = write_reproducible_tar(model, Path(tmp) / f"{user}.tar.gz", arcname=user)
        tarball = out_dir / f"{user}.tar.gz"
        # the bytes and their digest appear together, in one rename: a reader never finds a
        # new tarball with the old digest (as between two renames, tarball then .sha256)
        digest = storage.publish_local(staged, tarball)
        write_checksum(tarball, digest)  # for people and sha256sum -c; readers use the attribute
        return tarball


def upload_package(tarball: Path, uri: str) -> str:
    """Upload a package to S3 in one PUT that carries its sha256 (S3's checksum and
    ``x-amz-meta-sha256``, :func:`avatarforge.storage.publish`); returns the URI."""
    storage.publish(Path(tarball), uri)
    return uri


def unpack_package(package: Path, staging: Path) -> Path:
    """Extract a user package (``<user>.tar.gz``, checked against the sha256 published with it)
    safely into the new folder ``staging`` and return the model folder in it, checked to be
    exactly what the packager writes for that user (what a repository or the MME serves)."""
    package = Path(package)
    if not package.name.endswith(".tar.gz"):
        raise PackageError(f"{package}: a package is named <user>.tar.gz")
    name = check_user_name(package.name.removesuffix(".tar.gz"))
    Path(staging).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=Path(staging).parent) as tmp:
        # a copy, checked as it is read: the bytes checked are the bytes extracted, even if the
        # package is published again meanwhile
        copy = Path(tmp) / package.name
        try:
            storage.fetch_published(str(package), copy, name=package.name)
        except storage.UnpublishedError:
            raise PackageError(
                f"{package}: no sha256 published with it (neither its attribute nor "
                f"{checksum_path(package).name} beside it; repackage: make package USER=...)"
            ) from None
        except (storage.ChecksumFileError, storage.ChecksumMismatchError) as exc:
            raise PackageRefusedError(str(exc)) from None
        safe_extract(copy, staging)
    try:
        found = sorted(p.name for p in Path(staging).iterdir())
        if found != [name] or not (Path(staging) / name).is_dir():
            raise PackageError(f"{package} holds {found}, expected one folder {name}/")
        check_package(Path(staging) / name, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a refused package leaves nothing behind
        raise
    return Path(staging) / name


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
