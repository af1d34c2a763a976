"""avatarforge installed from its wheel, outside the checkout, packages and serves a user.

This is how it runs inside the Triton image's serving env and the LMI training image: no
source tree, every template and model file read from the installed package. The fresh venv
gets the wheel in its own site-packages (first on sys.path) and borrows the third-party
packages of this environment through a .pth file, so the test takes seconds, not a reinstall
of torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

SERVE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import avatarforge
    from avatarforge.mme import MultiModelLoader
    from avatarforge.mme.generate import generate_request, images_from_response
    from avatarforge.tritonserver.sagemaker import sagemaker_triton
    from avatarforge.serving.config import local_instance_env

    work, base = Path(sys.argv[1]), sys.argv[2]
    env = local_instance_env(base, work / "shared")  # the serving env: this venv
    with sagemaker_triton(work / "mme", extra_env=env) as server:
        loader = MultiModelLoader(server.sagemaker_url, str(work / "pkg"), work / "models")
        try:
            request = generate_request("a photo of <<TOK>> person",
                                       gen_args={"steps": 2, "height": 64, "width": 64})
            (image,) = images_from_response(loader.invoke("alice.tar.gz", request))
        finally:
            loader.unload_all()
    print(json.dumps({"size": image.size, "avatarforge": avatarforge.__file__}))
    """
)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory, repo_root) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp / "dist"), str(repo_root)],
        check=True, cwd=tmp,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("avatarforge-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
         str(wheel)],
        check=True,
    )  # fmt: skip
    (site / "borrowed.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "AVATARFORGE_BUILD": str(cwd / "build")}
    return subprocess.run(
        [str(venv / "bin" / "python"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_every_file_the_package_reads_is_shipped_in_the_wheel(repo_root) -> None:
    """The wheel holds the Python modules and what pyproject's package-data names: a template,
    web page or model file put anywhere else works from the checkout and is missing from the
    installed package (the serving env, the LMI image)."""
    import tomllib

    config = tomllib.loads((repo_root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["avatarforge"]
    package = repo_root / "src" / "avatarforge"
    data = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert data, "no package data found"
    # setuptools reads the patterns as globs ("**": any folders, none included), as pathlib does
    shipped = {p.relative_to(package).as_posix() for pat in patterns for p in package.glob(pat)}
    unshipped = [f for f in data if f not in shipped]
    assert unshipped == [], f"add these to [tool.setuptools.package-data]: {unshipped}"


@pytest.mark.integration
def test_wheel_packages_and_serves_a_user_outside_the_checkout(
    wheel_venv, trained_adapter, tiny_base, tmp_path
):
    where = _run(wheel_venv, "-c", "import avatarforge; print(avatarforge.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(wheel_venv)), where  # the wheel, not the checkout
    packaged = _run(
        wheel_venv, "-m", "avatarforge", "package", "--user", "alice",
        "--adapter", str(trained_adapter), "--base", str(tiny_base.path),
        "--out", str(tmp_path / "pkg"), cwd=tmp_path,
    )  # fmt: skip
    assert packaged.returncode == 0, packaged.stdout + packaged.stderr
    assert (tmp_path / "pkg" / "alice.tar.gz").is_file()
    served = _run(wheel_venv, "-c", SERVE, str(tmp_path), str(tiny_base.path), cwd=tmp_path)
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    result = json.loads(served.stdout.strip().splitlines()[-1])
    assert result["size"] == [64, 64]
    assert result["avatarforge"].startswith(str(wheel_venv))
