"""`make env`: build (or check) the serving environment of this checkout.

conda + conda-pack where conda exists; otherwise a venv from /usr/bin/python3.11 in
build/envs/serve, usable as Triton's EXECUTION_ENV_PATH (see avatarforge.envs for how and why).
For the SageMaker Triton image, build it inside the image instead: conda_envs/build_in_image.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avatarforge import envs

CHECKOUT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="[default: build/envs/serve]")
    parser.add_argument("--plan", action="store_true", help="print the plan and stop")
    parser.add_argument("--pack", action="store_true", help="also write <out>.tar.gz")
    args = parser.parse_args(argv)
    env_plan = envs.plan(CHECKOUT, args.out)
    if args.plan:
        print(json.dumps(env_plan.to_dict(), indent=2))
        return 0
    print(f"serving env ({env_plan.kind}) at {env_plan.env_dir}: {env_plan.state}")
    envs.build(env_plan, log=print)
    print(envs.check_env(env_plan.env_dir))
    if args.pack:
        out = envs.pack(
            env_plan.env_dir, env_plan.env_dir.with_suffix(".tar.gz"), kind=env_plan.kind
        )
        print(f"packed {out} ({out.stat().st_size / 2**20:.0f} MiB)")
    print(f"EXECUTION_ENV_PATH={env_plan.env_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
