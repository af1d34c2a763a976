"""README.md and docs/*.md as a new user meets them: every code block that can run here runs
as written.

The blocks run in page order in a fresh folder per page (with this checkout's Makefile and
venv), the way a person copies them: shell blocks in bash, Python blocks in the venv's Python. A
`make local-triton` or `make local-mme` line keeps running while the blocks after it run (it
is started in the background and stopped at the end, as a second shell would). The only change
made to the text: ports 8000-8002 and 8080 become free ones, so the test cannot collide with a
server the machine already runs. A block that cannot run here carries the comment
``<!-- not run by the tests: why -->`` right above it, or ``<!-- run by tests/x.py::test: why
-->`` when that test runs it as written against stand-ins (tests/fixtures/markdown.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.markdown import Block, code_blocks
from PIL import Image

from avatarforge.netutil import free_port

# lines that start a server which runs until stopped
SERVERS = ("make local-triton", "make local-mme")
REPO = Path(__file__).resolve().parents[1]
# generated text, whose blocks carry no marker: the test named runs them as written
GENERATED = {"docs/request.md": "tests/test_contract.py (against a real tritonserver)"}
DOCS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in ("bash", "python") and not b.skip]


@pytest.mark.parametrize("page", ["README.md", *DOCS])
def test_every_code_block_runs_or_says_why_not(page):
    blocks = code_blocks((REPO / page).read_text())
    for b in blocks:
        assert b.lang in ("", "bash", "python"), f"{page}:{b.line}: unknown language {b.lang}"
        if b.run_by:  # the test it names exists and reads its block by that marker
            path, name = b.run_by
            source = (REPO / path).read_text()
            assert f"def {name}(" in source and f'"{name}"' in source, f"{page}:{b.line}"
    assert all(len(b.skip) > 10 for b in blocks if b.skip)  # a reason, not a placeholder
    if page == "README.md":
        run = runnable(blocks)
        assert len(run) >= 4, [b.line for b in run]  # step by step, eval, local MME, forget


class Workspace:
    """A fresh folder where README commands run: the checkout's Makefile, pyproject.toml and
    venv linked in, build/ its own, servers started in the background and always stopped."""

    def __init__(self, root: Path, repo: Path) -> None:
        self.root = root
        for name in ("Makefile", "pyproject.toml"):
            (root / name).symlink_to(repo / name)
        (root / ".venv").symlink_to(Path(sys.prefix))
        self.env = {k: v for k, v in os.environ.items() if k != "AVATARFORGE_BUILD"}
        self.env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{self.env['PATH']}"
        self.ports = {p: free_port() for p in (8000, 8001, 8002, 8080)}
        self.servers: list[subprocess.Popen] = []

    def localize(self, text: str) -> str:
        """The block's text with free ports in place of the well-known ones."""
        for known, port in self.ports.items():
            text = re.sub(rf"(?<=127\.0\.0\.1:){known}\b", str(port), text)
        text = re.sub(
            r"^make local-triton\b",
            f"make local-triton PORT={self.ports[8000]} GRPC_PORT={self.ports[8001]} "
            f"METRICS_PORT={self.ports[8002]}",
            text,
            flags=re.M,
        )
        return re.sub(
            r"^make local-mme\b", f"make local-mme PORT={self.ports[8080]}", text, flags=re.M
        )

    def bash(self, script: str, where: str) -> None:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f"{where}: exit {done.returncode}\n{script}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )

    def python(self, source: str, where: str) -> None:
        done = subprocess.run(
            [sys.executable, "-c", source],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stderr}"

    def start_server(self, line: str, where: str) -> None:
        """Start ``line`` in the background and wait for what a person waits for: the server
        printing how to use it ("try: ..."), which it does once its models are loaded."""
        log_path = self.root / f"server-{len(self.servers)}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {line}"],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.servers.append(process)
        deadline = time.monotonic() + 300
        while not re.search(r"^try: ", log_path.read_text(), re.M):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{where}: {line} did not start\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def run_shell_block(self, text: str, where: str) -> None:
        """Run the block's lines in order; a server line starts in the background."""
        text = self.localize(text)
        pending: list[str] = []
        for line in text.splitlines():
            server = next((s for s in SERVERS if line.startswith(s)), None)
            if server is None:
                pending.append(line)
                continue
            if any(p.strip() and not p.lstrip().startswith("#") for p in pending):
                self.bash("\n".join(pending), where)
            pending = []
            command = line.split("#", 1)[0].strip()
            self.start_server(command, where)
        if any(p.strip() and not p.lstrip().startswith("#") for p in pending):
            self.bash("\n".join(pending), where)

    def stop(self) -> None:
        # SIGTERM, as `kill` would: the CLI stops its tritonserver (a background job ignores ^C)
        for process in self.servers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.servers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _is_jpeg(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "JPEG" and image.size[0] >= 64


def _run(ws: Workspace, blocks: list[Block], page: str) -> None:
    """Each block in turn, as a reader pastes it: bash in a shell, Python in the venv."""
    for block in blocks:
        where = f"{page}:{block.line}"
        if block.lang == "bash":
            ws.run_shell_block(block.text, where)
        else:
            ws.python(ws.localize(block.text), where)


@pytest.mark.integration
@pytest.mark.slow
def test_readme_blocks_run_as_written_on_a_fresh_folder(repo_root, tmp_path):
    blocks = runnable(code_blocks((repo_root / "README.md").read_text()))
    ws = Workspace(tmp_path, repo_root)
    try:
        _run(ws, blocks, "README.md")
        # what the blocks promise, where they say it will be
        build = tmp_path / "build"
        assert (build / "users/alice/adapter/pytorch_lora_weights.safetensors").is_file()
        assert (build / "package/alice.tar.gz").is_file()
        generated = sorted((build / "generate/alice").glob("*.jpg"))
        assert [p.name for p in generated] == ["00.jpg", "01.jpg"]  # local-triton, then MME
        assert all(_is_jpeg(p) for p in generated)
        assert len(list((build / "generate-local/alice").glob("*.jpg"))) == 1
        assert (build / "eval/alice/report.json").is_file()
        assert (build / "avatars/alice/professional/index.html").is_file()
    finally:
        ws.stop()
    assert all(p.returncode is not None for p in ws.servers)


def _docs_to_run() -> list[str]:
    return [
        page
        for page in DOCS
        if page not in GENERATED and runnable(code_blocks((REPO / page).read_text()))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("page", _docs_to_run())
def test_docs_blocks_run_as_written_on_a_fresh_folder(page, tmp_path):
    # the reference pages' blocks stand alone (a style pack, forget's dry run, a webhook
    # receiver): each page in its own fresh folder; one that starts a server is stopped after
    blocks = runnable(code_blocks((REPO / page).read_text()))
    ws = Workspace(tmp_path, REPO)
    try:
        _run(ws, blocks, page)
    finally:
        ws.stop()
