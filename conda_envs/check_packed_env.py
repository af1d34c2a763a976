"""Check a packed serving env the way Triton 25.08 and later start it, without `activate`.

The env is extracted by the bootstrap's own code (once, conda-unpack run in place), then
``python3`` is started the way python_backend r25.09 starts the stub of a model whose
EXECUTION_ENV_PATH is that folder: the server's environment plus the few variables the backend
sets itself (:func:`environ_like_25_09`) — the env's ``bin/activate`` is never sourced, so
conda's ``etc/conda/activate.d`` hooks never run — and the shared base's imports are made.
The stub's embedded Python finds its prefix through the first ``python3`` on PATH, as this does.

Standard library only: it runs under the Triton image's own python3 (conda_envs/Dockerfile,
with bootstrap.py copied beside it) and in the tests (tests/test_serving_env.py).
Usage: python3 check_packed_env.py TARBALL [MODULE ...]; prints a JSON report, exits 1 with
the problems when there are any.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# What the shared base's model.py imports (bootstrap.SHARED_BASE_MODEL_PY), and what that needs.
SHARED_BASE_IMPORTS = (
    "avatarforge.serving.shared_base",
    "avatarforge.serving.handler",
    "torch",
    "diffusers",
    "peft",
    "transformers",
    "numpy",
)
_HERE = Path(__file__).resolve().parent


def environ_like_25_09(env_dir: str, environ: dict) -> dict:
    """The environment the stub's Python gets from python_backend r25.09 for EXECUTION_ENV_PATH
    ``env_dir`` (the folder's realpath, pb_env.cc), given the server's ``environ``.

    ParseActivationScript (src/pb_utils.cc:361-409) takes the server's environment, sets
    VIRTUAL_ENV and VIRTUAL_ENV_PROMPT, puts <env>/bin before PATH and <env>/lib before
    LD_LIBRARY_PATH, drops PYTHONHOME, and reads nothing from the activate script. Then
    PrepareEnvironment (pb_utils.cc:413-438) puts <env>/lib before LD_LIBRARY_PATH once more,
    and the stub takes that first entry off again (src/pb_stub.cc:187-211). The same from
    r25.08, where it came in, to r25.12.
    """
    env = dict(environ)
    env["VIRTUAL_ENV"] = env_dir
    env["VIRTUAL_ENV_PROMPT"] = f"({env_dir})"
    for name, sub in (("PATH", "bin"), ("LD_LIBRARY_PATH", "lib")):
        env[name] = f"{env_dir}/{sub}" + (f":{environ[name]}" if name in environ else "")
    env.pop("PYTHONHOME", None)
    return env


def load_bootstrap():
    """bootstrap.py: beside this file (in the image build), else in the checkout's sources."""
    for path in (_HERE / "bootstrap.py", _HERE.parent / "src/avatarforge/serving/bootstrap.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("avatarforge_bootstrap", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError("bootstrap.py is neither beside this script nor in a checkout")


_PROBE = """
import importlib, json, sys
modules = {name: importlib.import_module(name).__file__ for name in sys.argv[1:]}
print(json.dumps({"prefix": sys.prefix, "version": sys.version.split()[0], "modules": modules}))
"""


def check(tarball: Path, modules=SHARED_BASE_IMPORTS, work_dir: Path | None = None) -> dict:
    """Extract ``tarball`` as an instance does and import ``modules`` as 25.09 would start them.
    Returns a report; its "problems" list is empty when the env works."""
    bootstrap = load_bootstrap()
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="check-env-"))
    instance = bootstrap.Instance(
        {bootstrap.ENV_SHARED_DIR: str(work_dir), bootstrap.ENV_ENV_SOURCE: str(tarball)}
    )
    folder = os.path.realpath(bootstrap.ensure_env(instance))
    report = {"env": folder, "problems": []}
    hooks = sorted(p.name for p in Path(folder, "etc", "conda", "activate.d").glob("*"))
    if hooks:
        report["problems"].append(
            f"activation hooks {hooks}: Triton 25.08+ does not source bin/activate, so they "
            "would not run; set what they set some other way"
        )
    env = environ_like_25_09(folder, dict(os.environ))
    python3 = shutil.which("python3", path=env["PATH"])
    result = subprocess.run(
        [python3 or "python3", "-c", _PROBE, *modules],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        report["problems"].append(f"imports failed: {result.stderr.strip()[-2000:]}")
        return report
    report.update(json.loads(result.stdout))
    if os.path.realpath(report["prefix"]) != folder:
        report["problems"].append(f"python3 on PATH runs from {report['prefix']}, not the env")
    return report


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    work_dir = Path(tempfile.mkdtemp(prefix="check-env-"))
    try:
        report = check(Path(args[0]), tuple(args[1:]) or SHARED_BASE_IMPORTS, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
