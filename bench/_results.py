"""Where every benchmark writes what it measured: build/bench/<name>.json."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(name: str, args: dict, results: dict) -> Path:
    from avatarforge.paths import build_dir

    dest = build_dir() / "bench" / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"args": args, "results": results}, indent=2) + "\n")
    print(dest)
    return dest
