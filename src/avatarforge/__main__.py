"""``python -m avatarforge``: the CLI, for environments without the console script on PATH."""

from avatarforge.cli import main

main()
