"""What a served user package may hold: exactly what :func:`.package.package_user` writes.

A model tarball is code to Triton: a ``model.py``, a ``backend:`` naming a native library, a
``default_model_filename``, an ``EXECUTION_ENV_PATH`` archive that Triton unpacks itself, and
config parameters that would override the instance's settings all run or act inside
tritonserver. So a package is refused unless every file is one the packager writes and each
is what this installation would write for the values it declares:

- the file list is exactly ``config.pbtxt``, ``1/model.py``, ``1/avatarforge_bootstrap.py``,
  ``1/shared_base.json`` and the adapter's two files;
- ``model.py`` and the bootstrap are byte for byte this installation's (a package carries no
  code of its own; one from another avatarforge version is repackaged, not served);
- ``config.pbtxt`` and ``shared_base.json`` are re-rendered from the base id, base hash and
  ``max_batch_size`` they declare (bounds checked) and must come out identical: no other
  backend, file name, parameter, setting or environment path can pass (the shared base's
  settings are the instance's, never a package's);
- the adapter's weights match the sha256 in its metadata, on the base the config names.

The archive itself is checked first against the sha256 published with it (S3: the object's
checksum or ``x-amz-meta-sha256``; a local file: its ``user.avatarforge.sha256`` attribute, else
``<user>.tar.gz.sha256`` beside it; :func:`avatarforge.storage.fetch_published`) and by reading
its gzip stream to the end (the CRC). Every file but the weights is small (at most 1 MiB) and
read only after its size is checked.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .. import storage
from ..adapter import METADATA_FILE, WEIGHTS_FILE, AdapterError, read_adapter
from ..errors import AvatarforgeError
from ..hashing import sha256_file
from ..names import InvalidNameError, check_user_id
from ..settings import ConfigError
from . import bootstrap, triton_models
from .config import ModelParams, ServingConfig
from .triton_config import parse_pbtxt, sd_base_config, to_pbtxt, user_model_config

VERSION_DIR = "1"
BOOTSTRAP_FILE = "avatarforge_bootstrap.py"  # the name user.py imports it by
CHECKSUM_SUFFIX = storage.CHECKSUM_SUFFIX
MAX_SMALL_FILE_BYTES = 1024**2  # every file but the weights: a few KiB as the packager writes them
_ADAPTER = f"{VERSION_DIR}/{bootstrap.ADAPTER_SUBDIR}"
PACKAGE_FILES = frozenset(
    {
        "config.pbtxt",
        f"{VERSION_DIR}/model.py",
        f"{VERSION_DIR}/{BOOTSTRAP_FILE}",
        f"{VERSION_DIR}/{bootstrap.SHARED_BASE_FILE}",
        f"{_ADAPTER}/{WEIGHTS_FILE}",
        f"{_ADAPTER}/{METADATA_FILE}",
    }
)


class PackageError(AvatarforgeError, ValueError):
    """A user package cannot be written or served as asked; the message says why."""

    status = 400


class PackageRefusedError(PackageError):
    """The package is not one this installation serves; the message says what differs."""


def checksum_path(archive: Path) -> Path:
    """Where an archive's sha256 file lies: beside it, ``<name>.sha256``."""
    return archive.with_name(archive.name + CHECKSUM_SUFFIX)


def write_checksum(archive: Path, digest: str | None = None) -> Path:
    """Write ``<archive>.sha256`` in sha256sum's format (``digest``: the archive's, when the
    caller has it) and return its path."""
    path = checksum_path(archive)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{digest or sha256_file(archive)}  {archive.name}\n")
    tmp.replace(path)
    return path


def check_package(model_dir: Path, name: str | None = None, *, loaded: bool = False) -> None:
    """Refuse the extracted model folder ``model_dir`` unless it is exactly what the packager
    writes for the user it names (``name``: the user it must be, when the caller knows).
    ``loaded``: the folder of a model Triton has loaded, where Python's bytecode cache of its
    two modules (``1/__pycache__/*.pyc``) is allowed besides."""
    model_dir = Path(model_dir)
    user = model_dir.name
    where = f"package {user!r}"
    try:
        check_user_id(user, field="package folder")
    except InvalidNameError as exc:
        raise PackageRefusedError(str(exc)) from None
    if name is not None and user != name:
        raise PackageRefusedError(f"{where}: expected the folder {name}/ in its archive")
    _check_files(model_dir, where, loaded)
    version = model_dir / VERSION_DIR
    _check_same(version / "model.py", triton_models.source("user.py"), where)
    _check_same(version / BOOTSTRAP_FILE, triton_models.bootstrap_source(), where)
    base_id, base_hash = _check_config(model_dir / "config.pbtxt", user, where)
    _check_shared_base(version / bootstrap.SHARED_BASE_FILE, base_id, base_hash, where)
    try:
        meta = read_adapter(version / bootstrap.ADAPTER_SUBDIR)
    except AdapterError as exc:  # its paths, relative to the package: no server folder
        inside = str(exc).replace(f"{model_dir.parent}{os.sep}", "")
        raise PackageRefusedError(f"{where}: {inside}") from None
    if meta.base_hash != base_hash:
        raise PackageRefusedError(
            f"{where}: its adapter was trained on base {meta.base_hash[:12]}, its config names "
            f"{base_hash[:12]}"
        )


def _check_files(model_dir: Path, where: str, loaded: bool = False) -> None:
    found = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    if loaded:  # what the stub writes when it imports model.py and the bootstrap
        cache = re.compile(rf"{VERSION_DIR}/__pycache__/[\w.-]+\.pyc")
        found = {f for f in found if not cache.fullmatch(f)}
    if extra := sorted(found - PACKAGE_FILES):
        raise PackageRefusedError(
            f"{where}: holds files the packager never writes: {', '.join(extra[:5])}"
        )
    if missing := sorted(PACKAGE_FILES - found):
        raise PackageRefusedError(f"{where}: incomplete, missing {', '.join(missing)}")
    weights = f"{_ADAPTER}/{WEIGHTS_FILE}"
    for rel in sorted(found - {weights}):
        if (model_dir / rel).stat().st_size > MAX_SMALL_FILE_BYTES:
            raise PackageRefusedError(
                f"{where}: {rel} is larger than any the packager writes "
                f"({MAX_SMALL_FILE_BYTES // 1024} KiB at most)"
            )


def _check_same(path: Path, expected: bytes, where: str) -> None:
    if path.read_bytes() != expected:
        raise PackageRefusedError(
            f"{where}: {path.parent.name}/{path.name} is not the one this avatarforge packages "
            "(a package carries no code of its own; repackage it with `avatarforge package`)"
        )


def _check_config(path: Path, user: str, where: str) -> tuple[str, str]:
    text = path.read_text(errors="replace")
    try:
        config = parse_pbtxt(text)
    except (ValueError, RecursionError) as exc:
        raise PackageRefusedError(f"{where}: {exc}") from None
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    declared = ModelParams.from_params(params)
    base_id, base_hash = declared.base_id, declared.base_hash
    try:
        serving = ServingConfig(max_batch_size=int(config.get("max_batch_size", 0)))
        expected = to_pbtxt(user_model_config(user, base_id, base_hash, serving))
    except (ConfigError, ValueError) as exc:
        raise PackageRefusedError(f"{where}: config.pbtxt: {exc}") from None
    if text != expected or not base_id or not re.fullmatch(r"[0-9a-f]{64}", base_hash):
        raise PackageRefusedError(
            f"{where}: config.pbtxt is not the one the packager writes for it (only the base "
            "and max_batch_size may vary: no other backend, file name, parameter or env path)"
        )
    return base_id, base_hash


def _check_shared_base(path: Path, base_id: str, base_hash: str, where: str) -> None:
    # no settings of its own: the shared base's are the instance's (ServingConfig.from_env)
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise PackageRefusedError(f"{where}: {bootstrap.SHARED_BASE_FILE}: {exc}") from None
    except RecursionError:
        raise PackageRefusedError(
            f"{where}: {bootstrap.SHARED_BASE_FILE}: nested too deeply to be the packager's"
        ) from None
    if data != sd_base_config(base_id, base_hash):
        raise PackageRefusedError(
            f"{where}: {bootstrap.SHARED_BASE_FILE} is not the one the packager writes for its "
            "base (no environment path, parameter, setting or backend of its own)"
        )
