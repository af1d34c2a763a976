"""The README is the user's manual and docs/ its reference: the parts that come from code must
match the code."""

from __future__ import annotations

import re

from avatarforge.cli.config import markdown_table, settings_rows


def test_configuration_table_is_the_one_the_code_prints(repo_root):
    page = (repo_root / "docs" / "configuration.md").read_text()
    assert markdown_table(settings_rows()) in page, "run: avatarforge config --markdown"


def test_make_verbs_in_the_manual_exist_in_the_makefile(repo_root):
    makefile = (repo_root / "Makefile").read_text()
    pages = [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md"))]
    readme_verbs = set(re.findall(r"`make ([a-z-]+)", pages[0].read_text()))
    assert {"demo", "test", "package", "local-triton", "local-mme"} <= readme_verbs
    for page in pages:
        for verb in set(re.findall(r"`make ([a-z-]+)", page.read_text())):
            assert re.search(rf"^(\S+ )*{verb}( \S+)*:", makefile, re.M), f"{page.name}: {verb}"


def test_every_make_verb_is_in_docs_commands(repo_root):
    # docs/commands.md is the list a user reads; `make help` prints the same from the Makefile
    makefile = (repo_root / "Makefile").read_text()
    verbs = set(re.findall(r"^([a-z-]+):.*## ", makefile, re.M)) - {"help"}
    listed = set(
        re.findall(r"^\| `make ([a-z-]+)", (repo_root / "docs" / "commands.md").read_text(), re.M)
    )
    assert verbs <= listed, verbs - listed


def test_links_between_the_pages_lead_somewhere(repo_root):
    pages = [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_ci_runs_the_readme_test_command(repo_root):
    assert "make test" in (repo_root / ".ci" / "run").read_text()
