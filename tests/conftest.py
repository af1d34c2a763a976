"""Shared pytest setup. Each area keeps its fixtures in tests/fixtures/<area>.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Slow artefacts (tiny base, sample dataset, a short training run) are cached between runs
# under build/test-cache, keyed by their inputs; tests never write into the user's build/.
# Each pytest-xdist worker has its own (make test runs two): nothing the product or a fixture
# writes under the build folder (caches, the local MME's models, keys) is shared between them.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
os.environ.setdefault(
    "AVATARFORGE_BUILD", str(REPO / "build" / ("test-cache" + (f"-{_WORKER}" if _WORKER else "")))
)
# torch's CPU threads wait passively (avatarforge.cpu_threads: minutes on a loaded 2-core CPU);
# set before any fixture loads torch, in this process and the commands the tests start
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = [
    "fixtures.base",
    "fixtures.preprocess",
    "fixtures.train",
    "fixtures.serving",
    "fixtures.aws",
    "fixtures.mme",
    "fixtures.jobs",
    "fixtures.deploy",
    "fixtures.cloud",
]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect: every module is seen whole
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast lane (tests/fixtures/lanes.py): a test that starts a server is slow unless it is
    its module's ``smoke`` test; every module keeps at least one test that is not slow."""
    modules: dict[Path, list[pytest.Item]] = {}
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("smoke"):
            item.add_marker(pytest.mark.slow)
        modules.setdefault(item.path, []).append(item)
    if any("::" in arg for arg in config.args):
        return  # tests picked by node id: their modules were not collected whole
    lonely = sorted(
        path.name
        for path, tests in modules.items()
        if all(test.get_closest_marker("slow") for test in tests)
    )
    if lonely:
        raise pytest.UsageError(
            f"{', '.join(lonely)}: every test is slow, so `make test-fast` would skip the module; "
            "mark its quickest test @pytest.mark.smoke (and not slow)"
        )
