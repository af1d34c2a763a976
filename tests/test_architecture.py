"""The layout's rules, checked on the source (ast, nothing imported): what each layer of
``src/avatarforge`` may import, that nothing ships test code, and that only the CLI prints.

docs/architecture.md's "Layers" says the same in words; a new package or a new dependency
between layers is a decision: make it here, and there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "avatarforge"

# Small shared pieces every layer may use: errors, settings, paths, files, hashes, names,
# processes, ports, archives, storage (local + S3), images.
FOUNDATION = {
    "errors", "settings", "paths", "fsutil", "hashing", "names", "netutil", "subprocesses",
    "safe_tar", "storage", "imaging", "cpu_threads",
}  # fmt: skip
MODEL = {"base", "adapter", "generate"}
# Layer -> the layers (or dotted modules) it may import besides itself and FOUNDATION. In the
# order of the data's path; "*" is every layer but the CLI.
ALLOWED: dict[str, set[str]] = {
    **{unit: set() for unit in FOUNDATION},
    "tritonserver": {"envs"},  # finding, starting and stopping tritonserver (+ SageMaker front)
    "envs": set(),  # the serving Python environment
    "base": set(),
    "generate": set(),
    "adapter": {"base"},
    "preprocess": set(),
    "train": MODEL,
    "fullsize": {"base", "adapter", "train"},  # builds random adapters for benchmarks
    "export": {"base", "adapter", "fullsize"},
    "quality": MODEL | {"fullsize", "preprocess"},
    "gallery": set(),  # a user's rendered avatars as a page
    "packs": {"generate", "gallery", "serving", "mme", "cloud"},  # renders through any target
    # the names of the layers training adapts (train.lora) are the slots' layout
    "serving": MODEL | {"envs", "tritonserver", "train.lora"},
    "mme": {"serving", "generate", "tritonserver"},
    "jobs": MODEL | {"preprocess", "train", "serving"},
    "deploy": {"base", "serving", "envs", "tritonserver"},  # the MME env tritonserver runs with
    "cloud": {"generate", "serving", "mme", "jobs", "deploy"},
    "forget": {"serving", "mme", "tritonserver", "deploy"},  # finds a user everywhere
    # the HTTP API: the cloud client's calls, the service's request check and progress,
    # intake's photo check, packs, forget
    "api": {"cloud", "jobs", "deploy", "forget", "packs", "preprocess", "generate"},
    "testing": set(),  # sample photos, a small dataset, moto: for tests, bench and the demos
    "demos": {"*", "testing"},
    "cli": {"*", "testing", "demos"},
    "__main__": {"cli"},
}
# Top-level names that are test or benchmark code, never importable from the product.
TEST_CODE = {"tests", "fixtures", "conftest", "moto_ext", "bench"}
# Layers that may write to the console; every other module reports through return values,
# callbacks or logging.
PRINTS = {"cli", "__main__"}


def _units(src: Path) -> set[str]:
    return {
        p.stem if p.is_file() else p.name
        for p in src.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    }


def _module(path: Path, src: Path) -> tuple[str, bool]:
    if not path.is_relative_to(src):  # a script (bench/): no package
        return path.stem, False
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if package else parts), package


def imports(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, function-level ones included;
    relative imports resolved, ``from pkg import sub`` giving ``pkg.sub``."""
    name, package = _module(path, src)
    here = name.split(".") if package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == src.name:  # `from .. import storage`: the names are the modules
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def violations(src: Path = SRC, allowed: dict[str, set[str]] = ALLOWED) -> list[str]:
    """Every import that breaks a rule, as 'file:line: what'."""
    units = _units(src)
    out = [f"{src.name}/{u}: no rule for this layer in ALLOWED" for u in units - set(allowed)]
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        unit = (
            rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else ""
        )
        may = allowed.get(unit, set())
        if "*" in may:
            may = (units - {"cli"}) | may
        for line, module in imports(path, src):
            where = f"{src.name}/{rel}:{line}"
            top = module.split(".")[0]
            if top in TEST_CODE:
                out.append(f"{where}: imports test code {module}")
            if top != src.name or module == src.name or not unit:
                continue
            target = module.split(".")[1]
            dotted = ".".join(module.split(".")[1:])
            ok = target in (unit, *FOUNDATION, *may) or any(
                dotted == m or dotted.startswith(m + ".") for m in may if "." in m
            )
            if not ok and target in units:
                out.append(f"{where}: {unit} may not import {module}")
    return out


def printing(src: Path = SRC, prints: set[str] = PRINTS) -> list[str]:
    """Console output outside the layers that may print: print(), sys.stdout/stderr.write,
    rich (its Console)."""
    out = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if rel.parts[0].removesuffix(".py") in prints:
            continue
        where = f"{src.name}/{rel}"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in ("print", "pprint"):
                    out.append(f"{where}:{node.lineno}: {func.id}()")
                elif (
                    isinstance(func, ast.Attribute)
                    and func.attr == "write"
                    and isinstance(func.value, ast.Attribute)
                    and func.value.attr in ("stdout", "stderr")
                ):
                    out.append(f"{where}:{node.lineno}: {func.value.attr}.write()")
        out += [
            f"{where}:{line}: imports {module}"
            for line, module in imports(path, src)
            if module.split(".")[0] == "rich"
        ]
    return out


def test_every_layer_imports_only_what_it_may():
    found = violations()
    assert not found, "\n".join(["imports that break the layout's rules:", *found])


def test_only_the_cli_prints():
    found = printing()
    assert not found, "\n".join(["console output outside the CLI:", *found])


def test_bench_does_not_reach_into_the_tests():
    found = [
        f"bench/{path.name}:{line}: {module}"
        for path in sorted((REPO / "bench").glob("*.py"))
        for line, module in imports(path, SRC)
        if module.split(".")[0] in TEST_CODE - {"bench"}
    ]
    assert found == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "avatarforge"
    for name, text in {"__init__.py": "", **files}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"preprocess/__init__.py": "from ..cli import app\n"}, "preprocess may not import"),
        ({"serving/x.py": "def f():\n    from ..train.loop import train\n"}, "serving may not"),
        ({"train/x.py": "from avatarforge.testing import samples\n"}, "train may not import"),
        ({"names.py": "import fixtures.base\n"}, "imports test code fixtures.base"),
        ({"jobs/x.py": "from .. import cli\n"}, "jobs may not import avatarforge.cli"),
        ({"newthing.py": ""}, "newthing: no rule"),
    ],
)
def test_the_checks_catch_a_forbidden_import(tmp_path, files, expected):
    skeleton = {f"{u}/__init__.py": "" for u in ("cli", "train", "testing", "serving", "jobs")}
    src = _package(tmp_path, {**skeleton, "preprocess/__init__.py": "", **files})
    found = violations(src)
    assert any(expected in line for line in found), found
    # ...and the allowed ones pass
    ok = _package(tmp_path / "ok", {**skeleton, "serving/y.py": "from ..train.lora import A\n"})
    assert violations(ok) == []


def test_the_checks_catch_printing(tmp_path):
    src = _package(
        tmp_path,
        {
            "cli/__init__.py": "print('fine: the CLI prints')\n",
            "demos/x.py": "import sys\nsys.stdout.write('no')\n",
            "train.py": "def f():\n    print('no')\n",
            "deploy.py": "from rich.console import Console\n",
        },
    )
    found = printing(src)
    assert len(found) == 3 and not any("cli/" in line for line in found), found
