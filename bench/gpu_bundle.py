"""A tritonserver bundle for a GPU machine without network: built here, unpacked and checked there.

    python bench/gpu_bundle.py build [--python 3.12] [--out build/gpu-bundle]   (make gpu-bundle)
    python bench/gpu_bundle.py unpack build/gpu-bundle build/gpu-run           (on the machine)
    python bench/gpu_bundle.py check build/gpu-run [--expect-cuda] [--json F]  (on the machine)

The GPU machines of bench-gpu have Python 3.12 with a CUDA torch, no network, and get files
only with the working tree and at most 64 MiB of build outputs beside it. The bundle holds what
serving through the real tritonserver needs there, each part a reproducible .tar.xz:

  server     tritonserver 2.51 of the nvidia-pytriton wheel (binary, its libraries but the
             wheel's libpython3.13, the python backend, caches) and the backend stub of the
             target Python, laid out as the wheel is (``pytriton/tritonserver``,
             ``nvidia_pytriton.libs``) so that avatarforge.tritonserver finds it unchanged
  numpy      numpy < 2 for the target Python (its tests left out): the only package of the bare
             Python that user models run under, and in front of the machine's numpy in the
             serving env (the 2.51 stub dies on BYTES tensors with numpy 2)
  site       the pinned packages the machine may lack or hold in other versions (diffusers,
             peft, transformers; tritonclient and protobuf to render model configs)
  wheel      avatarforge's wheel, built from this checkout (its source key is recorded: unpack
             says when the checkout has changed since)
  vocab      the CLIP BPE vocabulary, to build the full-size base without open-clip-torch
  libpython  optional: libpython3.12.so.1.0 of Ubuntu 24.04 (``--libpython-deb``, or
             ``--fetch-libpython`` through apt), used only where the machine has none

``unpack`` verifies every part's sha256, extracts them, and makes two Pythons from the
machine's own interpreter: the bare one of user models (``<build>/envs/bare-py3.12``: numpy
only, where avatarforge.tritonserver.launch looks for it) and the serving env of the shared
base (numpy < 2 and the site packages in front of the machine's site-packages: its torch).
``check`` proves, before any timing, that the stub links a libpython, that a model under the
bare Python imports numpy < 2 and not avatarforge, that a model in the serving env imports
torch and sees CUDA, all through the real tritonserver; its JSON is what bench/gpu.py reads.
Nothing here needs more than the standard library, except ``check`` (avatarforge from ``src``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FORMAT = 1
MANIFEST = "manifest.json"
ENV_FILE = "env.json"  # written by unpack, read by check and bench/gpu.py --bundle
CHECK_FILE = "check.json"
DEFAULT_MAX_MIB = 58.0  # 64 MiB travel beside the working tree (~2 MiB)
NUMPY_PIN = "numpy==1.26.4"  # as pyproject.toml; < 2 for the 2.51 stub
SITE_FROM_EXTRAS = (("serve", ("diffusers", "peft", "transformers")), ("client", ("tritonclient",)))
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
LIBPYTHON_DEB = "libpython3.12t64"  # Ubuntu 24.04's, the distribution of the machines' 3.12.3
UBUNTU = "https://archive.ubuntu.com/ubuntu"
UBUNTU_SECURITY = "https://security.ubuntu.com/ubuntu"
# "Ubuntu Archive Automatic Signing Key (2018)", exported from ubuntu-keyring 2023.11.28.1
UBUNTU_KEY = Path(__file__).resolve().parent / "keys" / "ubuntu-archive-2018.gpg"
SKIP_DIRS = {"__pycache__", "tests"}  # never needed at run time


def log(message: str) -> None:
    print(f"[gpu_bundle] {message}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- build


def write_tar_xz(out: Path, members: list[tuple[Path, str]], level: int) -> Path:
    """``members`` (source path, name in the archive) as a reproducible .tar.xz: sorted, mtime
    0, owner root, modes kept (the server and stubs stay executable). xz runs on every core
    when the binary exists (the standard library's lzma is single-threaded)."""
    tmp = out.with_name(out.name + ".part")
    xz = shutil.which("xz")
    with open(tmp, "wb") as sink:
        if xz:
            proc = subprocess.Popen([xz, f"-{level}", "-T0", "-c"], stdin=subprocess.PIPE,
                                    stdout=sink)  # fmt: skip
            stream = proc.stdin
        else:
            proc, stream = None, lzma.LZMAFile(sink, "wb", preset=level)  # noqa: SIM115
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for source, name in sorted(members, key=lambda m: m[1]):
                info = tar.gettarinfo(str(source), arcname=name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
                if info.isfile():
                    with open(source, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        stream.close()
        if proc is not None and proc.wait() != 0:
            raise RuntimeError(f"xz failed on {out.name}")
    os.replace(tmp, out)
    return out


def tree_members(root: Path, prefix: str, *, skip=SKIP_DIRS, exclude=()) -> list[tuple[Path, str]]:
    """Every file and directory under ``root`` as archive members under ``prefix``."""
    members = [(root, prefix)]
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if set(rel.parts) & skip or any(rel.match(pattern) for pattern in exclude):
            continue
        if path.is_symlink():
            continue  # none in what we pack; a link would not travel as one anyway
        members.append((path, f"{prefix}/{rel.as_posix()}"))
    return members


def pytriton_root() -> tuple[Path, Path, str]:
    """(pytriton/tritonserver, nvidia_pytriton.libs, version) of the installed wheel."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-pytriton is not installed here (make setup)")
    server = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return (
        server,
        server.parent.parent / "nvidia_pytriton.libs",
        importlib.metadata.version("nvidia-pytriton"),
    )


def server_members(python: str) -> tuple[list[tuple[Path, str]], str]:
    server, libs, version = pytriton_root()
    stub = server / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise SystemExit(f"the nvidia-pytriton wheel has no python backend stub for {python}")
    members = tree_members(server / "bin", "pytriton/tritonserver/bin")
    members += tree_members(server / "backends", "pytriton/tritonserver/backends")
    members += tree_members(server / "caches", "pytriton/tritonserver/caches")
    members += [
        (stub.parent.parent, "pytriton/tritonserver/python_backend_stubs"),
        (stub.parent, f"pytriton/tritonserver/python_backend_stubs/{python}"),
        (stub, f"pytriton/tritonserver/python_backend_stubs/{python}/{stub.name}"),
    ]
    # every library but the wheel's libpython3.13 (32 MB): the stub links the machine's
    members += tree_members(libs, "nvidia_pytriton.libs", exclude=("libpython*",))
    return members, version


def pip_download(requirements: list[str], python: str, dest: Path) -> list[Path]:
    """Wheels of ``requirements`` (no dependencies) for CPython ``python`` on x86-64 Linux."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
           *(arg for p in PLATFORMS for arg in ("--platform", p)), "-d", str(dest),
           *requirements]  # fmt: skip
    subprocess.run(cmd, check=True)
    found = []
    for requirement in requirements:
        name, version = requirement.split("==")
        stem = f"{name.replace('-', '_').lower()}-{version}-"
        matches = [p for p in dest.glob("*.whl") if p.name.lower().startswith(stem)]
        if len(matches) != 1:
            raise SystemExit(f"pip download of {requirement}: expected one wheel, got {matches}")
        found.append(matches[0])
    return found


def unzip_wheels(wheels: list[Path], dest: Path) -> Path:
    """Install wheels by unpacking them (what pip does for these: no scripts are needed, and
    ``<name>.data/{purelib,platlib}`` move to the top)."""
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                parts = Path(info.filename).parts
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue  # scripts, headers: not used at run time
                    parts = parts[2:]
                target = dest.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)
    return dest


def installed_tree(name: str, dest: Path) -> Path:
    """A distribution installed in this environment, copied as its wheel would unpack."""
    import importlib.metadata

    dist = importlib.metadata.distribution(name)
    top = Path(dist.locate_file(""))
    dest.mkdir(parents=True, exist_ok=True)
    folders = {Path(str(f)).parts[0] for f in dist.files or ()} - {".."}  # ../bin: scripts
    for folder in sorted(folders):
        source = top / folder
        if source.is_dir() and not folder.endswith(".data"):
            shutil.copytree(source, dest / folder, symlinks=False,
                            ignore=shutil.ignore_patterns(*SKIP_DIRS))  # fmt: skip
    return dest


def pins() -> list[str]:
    """The site part's requirements, pinned as pyproject.toml pins them, plus protobuf and
    grpcio at the versions installed here: tritonclient's generated code refuses older ones
    (model_config_pb2 checks protobuf's version; importing tritonclient.grpc, grpcio's)."""
    import importlib.metadata

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = []
    for extra, names in SITE_FROM_EXTRAS:
        for requirement in extras[extra]:
            name = requirement.split("[")[0].split("==")[0]
            if name in names:
                wanted.append(f"{name}=={requirement.split('==')[1]}")
    return [*wanted, *(f"{d}=={importlib.metadata.version(d)}" for d in ("protobuf", "grpcio"))]


def build_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("avatarforge-*.whl"):
        old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dest), str(REPO)],
        check=True, cwd=dest,
    )  # fmt: skip
    (wheel,) = dest.glob("avatarforge-*.whl")
    return wheel


def fetch_libpython_deb(dest: Path) -> Path:
    """Ubuntu 24.04's libpython3.12 package through apt (its own client, a private config:
    this machine's apt state is left alone). apt checks the archive's signature with Ubuntu's
    archive key shipped beside this script (:data:`UBUNTU_KEY`, from the ubuntu-keyring
    package; fingerprint F6EC B376 2474 EDA9 D21B 7022 8719 20D1 991B C93C), then the package's
    hash against the signed index."""
    state = dest / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    sources = state / "sources.list"
    sources.write_text(
        "".join(
            f"deb [signed-by={UBUNTU_KEY} arch=amd64] {url} {suite} main\n"
            for url, suite in ((UBUNTU, "noble"), (UBUNTU, "noble-updates"),
                               (UBUNTU_SECURITY, "noble-security"))
        )
    )  # fmt: skip
    options = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/nonexistent",
               f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state / 'cache'}",
               "-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64",
               "-oAcquire::Languages=none", "-qq"]  # fmt: skip
    subprocess.run(["apt-get", *options, "update"], check=True)
    subprocess.run(["apt-get", *options, "download", LIBPYTHON_DEB], check=True, cwd=dest)
    debs = sorted(dest.glob(f"{LIBPYTHON_DEB}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {LIBPYTHON_DEB} left no .deb in {dest}")
    return debs[-1]


def libpython_from_deb(deb: Path, work: Path) -> Path:
    """libpython3.12.so.1.0 out of the .deb (data.tar.zst: dpkg-deb reads it)."""
    out = work / "deb"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
    (lib,) = out.rglob("libpython3.12.so.1.0")
    return lib.resolve()


class PartCache:
    """Built parts by the key of their inputs: a part is compressed once (xz -9 of the server
    takes minutes on 2 cores), then copied."""

    def __init__(self, folder: Path, level: int) -> None:
        self.folder, self.level = folder, level
        folder.mkdir(parents=True, exist_ok=True)

    def part(self, name: str, key_parts: list[Any], make) -> Path:
        key = hashlib.sha256(json.dumps([name, self.level, *key_parts]).encode()).hexdigest()
        cached = self.folder / f"{name}-{key[:16]}.tar.xz"
        if not cached.is_file():
            t0 = time.perf_counter()
            members = make()
            write_tar_xz(cached, members, self.level)
            seconds = time.perf_counter() - t0
            log(f"{name}: {cached.stat().st_size / 2**20:.1f} MiB in {seconds:.0f} s")
        return cached


def build(a: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "src"))
    from avatarforge.envs import source_key

    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = Path(a.out).resolve()
    cache = PartCache(Path(a.cache).resolve(), a.xz_level)
    work = Path(tempfile.mkdtemp(prefix="gpu-bundle-", dir=cache.folder))
    parts: dict[str, Path] = {}
    notes: list[str] = []
    try:
        members, pytriton_version = server_members(a.python)
        sizes = [(n, s.stat().st_size) for s, n in members if s.is_file()]
        parts["server"] = cache.part("server", [pytriton_version, sizes], lambda: members)

        if a.numpy_from_env:
            if a.python != here:
                raise SystemExit(f"--numpy-from-env: this is Python {here}, not {a.python}")
            import numpy

            if int(numpy.__version__.split(".")[0]) >= 2:
                raise SystemExit(f"--numpy-from-env: numpy {numpy.__version__} here; need < 2")
            key, make_numpy = (
                [numpy.__version__, here, "env"],
                lambda: installed_tree("numpy", work / "numpy"),
            )
        else:
            (wheel,) = pip_download([NUMPY_PIN], a.python, cache.folder / "wheels")
            key = [wheel.name, sha256(wheel)]
            make_numpy = lambda: unzip_wheels([wheel], work / "numpy")  # noqa: E731
        parts["numpy"] = cache.part("numpy", key, lambda: tree_members(make_numpy(), "numpy"))

        site_pins = [] if a.no_site else pins()
        if site_pins:
            wheels = pip_download(site_pins, a.python, cache.folder / "wheels")
            parts["site"] = cache.part(
                "site", sorted(w.name for w in wheels),
                lambda: tree_members(unzip_wheels(wheels, work / "site"), "site"),
            )  # fmt: skip

        wheel = build_wheel(work / "dist")
        parts["wheel"] = wheel

        vocab = find_vocab()
        if vocab is not None:
            parts["vocab"] = vocab
        else:
            notes.append("no CLIP BPE vocabulary (open-clip-torch is not installed here)")

        deb = Path(a.libpython_deb) if a.libpython_deb else None
        if deb is None and a.fetch_libpython:
            try:
                deb = fetch_libpython_deb(cache.folder / "debs")
            except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
                notes.append(f"no libpython fallback: fetching {LIBPYTHON_DEB} failed ({exc})")
        if deb is not None:
            lib = libpython_from_deb(deb, work)
            parts["libpython"] = cache.part(
                "libpython", [deb.name, sha256(deb)],
                lambda: [(lib, "libpython/libpython3.12.so.1.0")],
            )  # fmt: skip

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "python": a.python,
            "pytriton": pytriton_version,
            "numpy": NUMPY_PIN.split("==")[1] if not a.numpy_from_env else "from-env",
            "site": site_pins,
            "source_key": source_key(REPO),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "builder": {"python": platform.python_version(), "platform": platform.platform()},
            "xz_level": a.xz_level,
            "notes": notes,
            "parts": {},
        }
        for name, path in parts.items():
            dest = out / (path.name if name in ("wheel", "vocab") else f"{name}.tar.xz")
            shutil.copyfile(path, dest)
            manifest["parts"][name] = {
                "file": dest.name,
                "sha256": sha256(dest),
                "bytes": dest.stat().st_size,
            }
        total = sum(p["bytes"] for p in manifest["parts"].values())
        manifest["total_bytes"] = total
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, part in manifest["parts"].items():
        log(f"{name:10} {part['bytes'] / 2**20:7.2f} MiB  {part['file']}")
    for note in notes:
        log(f"note: {note}")
    log(f"total {total / 2**20:.1f} MiB in {out} (limit {a.max_mib} MiB)")
    if total > a.max_mib * 2**20:
        log(f"error: the bundle is over {a.max_mib} MiB: it would not travel beside the tree")
        return 1
    return 0


def find_vocab() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


# ---------------------------------------------------------------- unpack (on the machine)


def extract(archive: Path, dest: Path) -> None:
    """Our own archives (sha256 checked), still refusing what could leave ``dest``: the
    "data" filter where tarfile has it (3.11.4+), the same checks by hand before."""
    with tarfile.open(archive, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise SystemExit(f"{archive.name}: refusing member {member.name!r}")
        tar.extractall(dest)


def site_packages(env: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return env / "lib" / version / "site-packages"


def make_venv(env: Path) -> Path:
    """A venv of this interpreter's base Python, without pip: ``bin/python3`` is what the stub
    finds on PATH (or through bin/activate) to take its prefix and site-packages from."""
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    return site_packages(env)


def machine_site_packages() -> list[str]:
    """Where this interpreter's packages are (the machine's torch, cuda libraries, ...)."""
    import site

    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def unpack(a: argparse.Namespace) -> int:
    bundle, dest = Path(a.bundle).resolve(), Path(a.dest).resolve()
    manifest = json.loads((bundle / MANIFEST).read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        log(f"error: the bundle is for Python {manifest['python']}, this is {here}")
        return 2
    t0 = time.perf_counter()
    for part in manifest["parts"].values():
        if sha256(bundle / part["file"]) != part["sha256"]:
            log(f"error: {part['file']} does not match its sha256 in {MANIFEST}")
            return 2
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    parts = manifest["parts"]
    extract(bundle / parts["server"]["file"], dest / "server")
    extract(bundle / parts["numpy"]["file"], dest)  # dest/numpy: the numpy tree
    if "site" in parts:
        extract(bundle / parts["site"]["file"], dest)
    else:
        (dest / "site").mkdir()
    unzip_wheels([bundle / parts["wheel"]["file"]], dest / "site")
    vocab = None
    if "vocab" in parts:
        vocab = dest / "vocab" / parts["vocab"]["file"]
        vocab.parent.mkdir()
        shutil.copyfile(bundle / parts["vocab"]["file"], vocab)
    if "libpython" in parts:
        extract(bundle / parts["libpython"]["file"], dest)
    (dest / "server" / "pytriton" / "__init__.py").write_text(
        '"""tritonserver of the nvidia-pytriton wheel, unpacked from the GPU bundle."""\n'
    )

    build = Path(a.build_dir or os.environ.get("AVATARFORGE_BUILD") or dest / "build").resolve()
    # the bare Python of user models, where avatarforge.envs.bare_env finds it (a Python like
    # the stock image's: numpy and nothing else)
    bare = build / "envs" / f"bare-py{here}"
    bare_site = make_venv(bare)
    shutil.copytree(dest / "numpy", bare_site, dirs_exist_ok=True)
    # the shared base's serving env: numpy < 2 first (its own site-packages), then the pinned
    # packages and avatarforge, then the machine's packages (torch)
    serve = dest / "envs" / "serve"
    serve_site = make_venv(serve)
    shutil.copytree(dest / "numpy", serve_site, dirs_exist_ok=True)
    dirs = [str(dest / "site"), *machine_site_packages()]
    (serve_site / "avatarforge-gpu-bundle.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n"
    )
    sys.path.insert(0, str(REPO / "src"))
    from avatarforge.envs import source_key

    env = {
        "bundle": str(bundle),
        "manifest": manifest,
        "python": here,
        "build_dir": str(build),
        "server": str(dest / "server"),
        "site": str(dest / "site"),
        "bare_env": str(bare),
        "serve_env": str(serve),
        "machine_site_packages": dirs[1:],
        "vocab": str(vocab) if vocab else None,
        "libpython_fallback": str(dest / "libpython") if "libpython" in parts else None,
        "ld_library_path": [],  # what check finds the stub needs (a libpython folder)
        "source_key_matches": manifest["source_key"] == source_key(REPO),
        "unpack_s": round(time.perf_counter() - t0, 1),
    }
    (dest / ENV_FILE).write_text(json.dumps(env, indent=1) + "\n")
    if not env["source_key_matches"]:
        log("warning: src/avatarforge changed since the bundle was built: the serving env runs "
            "the bundle's wheel (rebuild: make gpu-bundle)")  # fmt: skip
    log(f"unpacked {bundle} into {dest} in {env['unpack_s']} s (build dir {build})")
    return 0


# ---------------------------------------------------------------- check (on the machine)

CHECK_MODEL = """
import json, os, sys
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        info = {"python": sys.version.split()[0], "prefix": sys.prefix,
                "numpy": np.__version__, "kind": args["model_instance_kind"]}
        for name in ("avatarforge", "torch", "diffusers"):
            try:
                module = __import__(name)
                info[name] = getattr(module, "__version__", "importable")
                info[name + "_file"] = getattr(module, "__file__", None)
            except ImportError as exc:
                info[name] = None
                info[name + "_error"] = str(exc)
        if info["torch"]:
            import torch
            info["cuda"] = torch.cuda.is_available()
            info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
        with open("/proc/self/maps") as f:
            info["libpython"] = sorted({l.split()[-1] for l in f if "libpython" in l})
        self.info = json.dumps(info)

    def execute(self, requests):
        out = np.array([[self.info.encode()]], dtype=object)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("INFO", out)]) for _ in requests]
"""


def check_model_config(name: str, kind: str, env_path: str = "") -> str:
    params = (
        f'parameters {{ key: "EXECUTION_ENV_PATH" value {{ string_value: "{env_path}" }} }}\n'
        if env_path
        else ""
    )
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "IN" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        'output [ { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        f"instance_group [ {{ kind: {kind} count: 1 }} ]\n{params}"
    )


def infer_info(url: str, model: str) -> dict:
    body = json.dumps({"inputs": [{"name": "IN", "datatype": "BYTES", "shape": [1, 1],
                                   "data": ["?"]}]}).encode()  # fmt: skip
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(json.loads(r.read())["outputs"][0]["data"][0])


def ldd_libpython(stub: Path, ld_path: list[str]) -> str | None:
    """Where the dynamic loader finds the stub's libpython (None: not found). Without ldd,
    the stub is run with no arguments: the loader's complaint says it cannot start."""
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(ld_path)}
    if not shutil.which("ldd"):
        run = subprocess.run([str(stub)], capture_output=True, text=True, env=env, timeout=60)
        return None if "error while loading shared libraries" in run.stderr else "(loads; no ldd)"
    out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout
    for line in out.splitlines():
        if "libpython" in line:
            target = line.split("=>", 1)[-1].strip()
            return None if target.startswith("not found") else target.split(" (")[0]
    return None


def libpython_candidates(python: str, env: dict) -> list[Path]:
    """Folders that may hold libpython<python>.so.1.0 where the loader does not look: the
    base interpreter's LIBDIR (a python-build-standalone or /opt install), then the bundle's."""
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    folders = [Path(found.strip())] if found.strip() else []
    folders += [Path(sys.base_prefix) / "lib"]
    if env.get("libpython_fallback"):
        folders.append(Path(env["libpython_fallback"]))
    name = f"libpython{python}.so.1.0"
    return [f for f in folders if (f / name).is_file()]


def run_python(python: Path, code: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=clean,
                         cwd="/", timeout=300)  # fmt: skip
    if out.returncode:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
info = {"python": sys.version.split()[0], "prefix": sys.prefix}
for name in %s:
    try:
        module = __import__(name)
        info[name] = getattr(module, "__version__", "importable")
        info[name + "_file"] = getattr(module, "__file__", None)
    except ImportError as exc:
        info[name] = None
if info.get("torch"):
    import torch
    info["cuda"] = torch.cuda.is_available()
print(json.dumps(info))
"""


def check(a: argparse.Namespace) -> int:
    dest = Path(a.dest).resolve()
    env = json.loads((dest / ENV_FILE).read_text())
    python = env["python"]
    results: dict[str, dict] = {}

    def record(name: str, ok: bool, **detail) -> None:
        results[name] = {"ok": bool(ok), **detail}
        log(f"{'ok  ' if ok else 'FAIL'} {name}: {json.dumps(detail)[:300]}")

    record("bundle wheel matches src/avatarforge", env["source_key_matches"])
    smi = shutil.which("nvidia-smi")
    gpus = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else ""
    try:
        import torch

        cuda = torch.cuda.is_available()
        record("CUDA visible to this Python", cuda or not a.expect_cuda, torch=torch.__version__,
               cuda=cuda, nvidia_smi=gpus or None)  # fmt: skip
    except ImportError as exc:
        record("CUDA visible to this Python", False, error=str(exc))

    server = Path(env["server"])
    libs = server / "nvidia_pytriton.libs"
    stub = server / "pytriton/tritonserver/python_backend_stubs" / python
    stub = stub / "triton_python_backend_stub"
    extra: list[str] = []
    where = ldd_libpython(stub, [str(libs)])
    if where is None:
        for folder in libpython_candidates(python, env):
            found = ldd_libpython(stub, [str(libs), str(folder)])
            if found:
                extra, where = [str(folder)], found
                break
    record(f"stub {python} links libpython{python}.so.1.0", bool(where), found=where,
           added_to_ld_library_path=extra,
           fallback=bool(extra) and extra[0] == env.get("libpython_fallback"))  # fmt: skip
    env["ld_library_path"] = extra
    (dest / ENV_FILE).write_text(json.dumps(env, indent=1) + "\n")

    bare = run_python(Path(env["bare_env"]) / "bin" / "python3",
                      PROBE % (("numpy", "avatarforge", "torch"),))  # fmt: skip
    record("bare Python: numpy < 2 only", "error" not in bare and _numpy_lt_2(bare)
           and bare.get("avatarforge") is None and bare.get("torch") is None, **bare)  # fmt: skip
    serve = run_python(Path(env["serve_env"]) / "bin" / "python3",
                       PROBE % (("numpy", "torch", "diffusers", "peft", "transformers",
                                 "avatarforge"),))  # fmt: skip
    record("serving env: numpy < 2 before the machine's torch", "error" not in serve
           and _numpy_lt_2(serve) and serve.get("avatarforge") is not None
           and (serve.get("cuda") or not a.expect_cuda), **serve)  # fmt: skip

    results |= driver_checks(env, record=record)
    results |= triton_checks(env, expect_cuda=a.expect_cuda, record=record)
    ok = all(r["ok"] for r in results.values())
    report = {"ok": ok, "checks": results, "notes": machine_notes(),
              "python": platform.python_version(), "platform": platform.platform(),
              "command": " ".join(sys.argv)}  # fmt: skip
    (dest / CHECK_FILE).write_text(json.dumps(report, indent=1) + "\n")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    log(f"checks {'passed' if ok else 'FAILED'}: {dest / CHECK_FILE}")
    return 0 if ok else 1


def machine_notes() -> dict[str, Any]:
    """What the measurements may run short of, recorded (not judged): each python model takes
    16 MiB of /dev/shm (the SageMaker image's shm-default-byte-size), and compiling Triton
    kernels needs a C compiler."""
    notes: dict[str, Any] = {"cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        shm = os.statvfs("/dev/shm")
        notes["dev_shm_free_mib"] = round(shm.f_bavail * shm.f_frsize / 2**20)
    notes["c_compiler"] = shutil.which("cc") or shutil.which("gcc")
    with contextlib.suppress(OSError):
        total = os.statvfs(REPO)
        notes["disk_free_gib"] = round(total.f_bavail * total.f_frsize / 2**30, 1)
    return notes


def _numpy_lt_2(info: dict) -> bool:
    version = info.get("numpy") or "9"
    return int(version.split(".")[0]) < 2


def use_bundle(env: dict) -> None:
    """Make this process find the bundle's tritonserver and packages (after the checkout's src,
    which comes first) and the libpython folder check found the stub needs."""
    for path in (env["site"], env["server"]):
        if path not in sys.path:
            sys.path.insert(1, path)
    if env.get("ld_library_path"):
        old = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*env["ld_library_path"], old]).strip(":")
    os.environ["AVATARFORGE_BUILD"] = env["build_dir"]


def driver_checks(env: dict, *, record) -> dict:
    """What bench/gpu.py imports in this Python with the bundle in front: the pinned packages,
    and tritonclient's generated config code, which renders every package's config.pbtxt."""
    sys.path.insert(0, str(REPO / "src"))
    use_bundle(env)
    found: dict[str, Any] = {}
    try:
        for name in ("diffusers", "peft", "transformers", "grpc", "google.protobuf"):
            module = __import__(name, fromlist=["_"])
            found[name] = getattr(module, "__version__", "importable")
        from tritonclient.grpc import model_config_pb2  # noqa: F401

        from avatarforge.serving.triton_config import to_pbtxt, user_model_config

        found["config.pbtxt renders"] = bool(to_pbtxt(user_model_config("u", "b", "0" * 64)))
        record("the bench's Python imports the bundle's packages", True, **found)
    except Exception as exc:  # recorded: the measurements that need them say so
        record("the bench's Python imports the bundle's packages", False, **found,
               error=f"{type(exc).__name__}: {exc}"[-2000:])  # fmt: skip
    return {}


def triton_checks(env: dict, *, expect_cuda: bool, record) -> dict:
    """The real tritonserver from the bundle, one model under the bare Python and one in the
    serving env (where the shared base runs), each reporting what it could import."""
    sys.path.insert(0, str(REPO / "src"))
    use_bundle(env)
    from avatarforge.tritonserver.launch import tritonserver

    with tempfile.TemporaryDirectory(prefix="triton-check-") as tmp:
        repo = Path(tmp) / "models"
        models = {
            "bare_check": ("KIND_CPU", ""),
            "serve_check": ("KIND_AUTO" if expect_cuda else "KIND_CPU", env["serve_env"]),
        }
        for name, (kind, env_path) in models.items():
            (repo / name / "1").mkdir(parents=True)
            (repo / name / "config.pbtxt").write_text(check_model_config(name, kind, env_path))
            (repo / name / "1" / "model.py").write_text(CHECK_MODEL)
        infos: dict[str, dict] = {}
        try:
            t0 = time.perf_counter()
            with tritonserver([repo], log_path=Path(tmp) / "tritonserver.log",
                              startup_timeout=120) as server:  # fmt: skip
                from avatarforge.tritonserver.install import find_tritonserver

                record("tritonserver starts", True, seconds=round(time.perf_counter() - t0, 1),
                       binary=str(find_tritonserver().binary))  # fmt: skip
                for name in models:
                    t0 = time.perf_counter()
                    try:
                        server.load(name)
                        info = infer_info(server.url, name)
                        info["load_and_infer_s"] = round(time.perf_counter() - t0, 1)
                    except Exception as exc:  # recorded: the others still run
                        info = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
                    infos[name] = info
        except Exception as exc:
            record("tritonserver starts", False, error=f"{type(exc).__name__}: {exc}"[-3000:])
            return {}
    bare = infos.get("bare_check", {})
    record("a model under the bare Python: numpy < 2, no avatarforge",
           "error" not in bare and _numpy_lt_2(bare) and bare.get("avatarforge") is None
           and bare.get("python", "").startswith(env["python"]), **bare)  # fmt: skip
    serve = infos.get("serve_check", {})
    record("a model in the serving env: torch, numpy < 2" + (", CUDA" if expect_cuda else ""),
           "error" not in serve and _numpy_lt_2(serve) and bool(serve.get("torch"))
           and bool(serve.get("avatarforge")) and (serve.get("cuda") or not expect_cuda),
           **serve)  # fmt: skip
    return {}


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="make the bundle here")
    b.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    b.add_argument("--out", default=str(REPO / "build" / "gpu-bundle"))
    b.add_argument("--cache", default=str(REPO / "build" / "gpu-bundle-cache"))
    b.add_argument("--xz-level", type=int, default=9, choices=range(10), metavar="0-9")
    b.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB)
    b.add_argument(
        "--numpy-from-env",
        action="store_true",
        help="numpy of this environment (--python must be this Python's)",
    )
    b.add_argument(
        "--no-site",
        action="store_true",
        help="no pinned packages (the machine's own serve; e.g. this one's on a CPU)",
    )
    b.add_argument("--libpython-deb", help=f"a {LIBPYTHON_DEB} .deb to carry as a fallback")
    b.add_argument(
        "--fetch-libpython",
        action="store_true",
        help=f"get {LIBPYTHON_DEB} with apt (Ubuntu 24.04) as a fallback",
    )
    u = sub.add_parser("unpack", help="unpack the bundle and make the two Pythons")
    u.add_argument("bundle")
    u.add_argument("dest")
    u.add_argument("--build-dir", help="AVATARFORGE_BUILD there (default: $AVATARFORGE_BUILD, "
                   "else DEST/build)")  # fmt: skip
    c = sub.add_parser("check", help="check the unpacked bundle through the real tritonserver")
    c.add_argument("dest")
    c.add_argument("--expect-cuda", action="store_true")
    c.add_argument("--json", help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return {"build": build, "unpack": unpack, "check": check}[a.command](a)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
