"""`make env`: build the serving environment (see avatarforge.envs for how and why).

conda + conda-pack where conda exists; otherwise a venv from /usr/bin/python3.11 in
build/envs/serve, usable as Triton's EXECUTION_ENV_PATH. Options: --plan, --pack, --out DIR.
"""

import sys

from avatarforge.envs import main

if __name__ == "__main__":
    sys.exit(main())
