"""Shared pytest setup. Each area keeps its fixtures in tests/fixtures/<area>.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Slow artefacts (tiny base, sample dataset, a short training run) are cached between runs
# under build/test-cache, keyed by their inputs; tests never write into the user's build/.
os.environ.setdefault("AVATARFORGE_BUILD", str(REPO / "build" / "test-cache"))

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
