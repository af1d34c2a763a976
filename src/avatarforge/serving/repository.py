"""The repository a local tritonserver serves: model_setup rendered for this machine plus the
packaged users, unpacked the way SageMaker unpacks them (safely); :func:`load_package` adds a
packaged user to a running server's repository and loads it."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ..names import SETUP_MODEL, InvalidNameError, check_user_id
from ..tritonserver.control_key import headers
from ..tritonserver.launch import ServerError
from . import triton_models
from .package import unpack_package
from .triton_config import setup_model_config, to_pbtxt


def build_repository(
    out: Path,
    packages: Sequence[Path] = (),
    *,
    env_path: str | None = None,
) -> list[str]:
    """(Re)make ``out`` and return the user model names it holds; model_setup runs in
    ``env_path`` (a serving environment: it needs the full library; default: this one)."""
    if out.exists():
        shutil.rmtree(out)
    setup = out / SETUP_MODEL
    (setup / "1").mkdir(parents=True)
    (setup / "config.pbtxt").write_text(
        to_pbtxt(setup_model_config(env_path=env_path or sys.prefix))
    )
    (setup / "1" / "model.py").write_bytes(triton_models.source("model_setup.py"))
    users = []
    for package in packages:
        unpacked = out / f".{Path(package).name}.unpacked"
        model = unpack_package(Path(package), unpacked)
        shutil.move(model, out / model.name)
        shutil.rmtree(unpacked)
        users.append(model.name)
    return users


def load_package(
    url: str, repository: Path, package: Path, *, control_key: str, timeout: float = 600.0
) -> str:
    """Add a packaged user (``<user>.tar.gz``) to the repository of the running tritonserver
    at ``url`` and load it with Triton's repository API: no restart. Returns the model name.
    ``control_key`` opens that API (:mod:`avatarforge.tritonserver.control_key`).

    The archive is unpacked as :func:`~avatarforge.serving.repository.build_repository` does
    (:func:`~avatarforge.safe_tar.safe_extract`: traversal, links, bombs refused before
    anything is written) into a hidden folder of the repository, then renamed into place; a
    model of that name already there is replaced and reloaded. If Triton refuses the model,
    the repository is left as it was (and Triton keeps serving what it served). ``repository``
    must be the one the server serves: it must hold models the server lists, and no other."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from .package import PackageError

    package, repository = Path(package), Path(repository)
    try:  # before the name goes into any path below
        name = check_user_id(package.name.removesuffix(".tar.gz"), field="package")
    except InvalidNameError as exc:
        raise ServerError(str(exc)) from None
    if not package.is_file():
        raise ServerError(f"no package {package} (make package USER={name})")
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=timeout)
    key = headers(control_key)
    try:
        _check_serves(client, url, repository, key)
        staging = repository / f".{name}.loading-{os.getpid()}"
        old = repository / f".{name}.previous-{os.getpid()}"
        target = repository / name
        try:
            try:
                model = unpack_package(package, staging)
            except PackageError as exc:
                raise ServerError(str(exc)) from None
            if target.exists():
                os.replace(target, old)
            os.replace(model, target)
            try:
                client.load_model(name, headers=key)
            except InferenceServerException as exc:
                shutil.rmtree(target)
                if old.exists():
                    os.replace(old, target)
                raise ServerError(
                    f"tritonserver at {url} refused {name!r}: {exc.message()}"
                ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        client.close()
    return name


def _check_serves(client, url: str, repository: Path, key: dict[str, str]) -> None:
    """ServerError unless the server at ``url`` answers, takes the control key, and
    ``repository`` is one it serves: it holds a model the server lists and none it does not (a
    package unpacked into a folder the server does not read would load nothing, or another
    folder's files)."""
    from tritonclient.utils import InferenceServerException

    try:
        index = {m["name"] for m in client.get_model_repository_index(headers=key)}
    except InferenceServerException as exc:
        if exc.status() == "403":
            raise ServerError(
                f"the tritonserver at {url} refused the control key: it is not the server "
                "started on that port by this build folder"
            ) from None
        raise ServerError(f"no tritonserver answers at {url}: {exc}") from None
    except OSError as exc:
        raise ServerError(f"no tritonserver answers at {url}: {exc}") from None
    models = (
        {p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if repository.is_dir()
        else set()
    )
    if not models & index or models - index:
        raise ServerError(
            f"the tritonserver at {url} does not serve {repository} (it lists "
            f"{', '.join(sorted(index)) or 'no models'}; the folder holds "
            f"{', '.join(sorted(models)) or 'none'}): give the repository it was started with"
        )
