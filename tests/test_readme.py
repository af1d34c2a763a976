"""The README is the user's manual: the parts that come from code must match the code."""

from __future__ import annotations

import re

from avatarforge.cli.config import markdown_table, settings_rows


def test_readme_config_table_is_the_one_the_code_prints(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert markdown_table(settings_rows()) in readme, "run: avatarforge config --markdown"


def test_readme_make_verbs_exist_in_the_makefile(repo_root):
    readme = (repo_root / "README.md").read_text()
    makefile = (repo_root / "Makefile").read_text()
    verbs = set(re.findall(r"`make ([a-z-]+)", readme))
    assert {"demo", "test", "package", "local-triton", "local-mme"} <= verbs
    for verb in verbs:
        assert re.search(rf"^(\S+ )*{verb}( \S+)*:", makefile, re.M), verb


def test_ci_runs_the_readme_test_command(repo_root):
    assert "make test" in (repo_root / ".ci" / "run").read_text()
