"""The README's shell blocks, run as written (documentation tests), so that they cannot drift.

Every ```bash (and ```python) block of README.md carries an HTML comment on the line before it:

    <!-- not tested: REASON -->                      not run here; the reason says why
    <!-- tested: a server ... -->                    starts a server: run in the background (see below)
    <!-- tested: against the server of "NAME" -->    run while the server whose command contains NAME runs
    <!-- tested: ... -->                             run as it is

The blocks run in the README's order, in a temporary working copy of the repository (symlinks to
its .venv, Makefile, pyproject.toml, tests and scripts; copies of deployments/ and k8s/, which the
README's commands rewrite), so outputs such as runs/ land there and the checkout stays clean. What
the test changes, and nothing else:
- a server block's port: `make serve` gets `PORT=<free port>`, `--port 8000` becomes that port,
  and `make` is run with `-o .venv/.installed` (never reinstall the environment from a test);
- `localhost:8000` / `127.0.0.1:8000` in later blocks become that port, and `ray.init(address="...")`
  the Ray address the server's banner printed;
- `curl` fails on an HTTP error status (`--fail-with-body`), and each block runs under `set -eo pipefail`.
A comment line of a block that is JSON (`# {"status": "ok"}`) is an output: it must be printed.
Servers are stopped by PID. Only 127.0.0.1 is ever addressed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import children, free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*(not tested|tested):\s*(.*?)\s*-->")
SERVER_OF = re.compile(r'against the server of "([^"]+)"')
BLOCK_TIMEOUT_S = 300
READY_TIMEOUT_S = 300


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "tested" | "not tested" | None
    note: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_blocks(text: str) -> list[Block]:
    """The ```bash and ```python blocks, each with the marker on the line just before its fence."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in ("bash", "sh", "shell", "console", "python"):
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
            blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                                marker.group(1) if marker else None, marker.group(2) if marker else ""))
        i = end + 1
    return blocks


def test_every_shell_block_is_run_or_marked_with_a_reason():
    blocks = readme_blocks(README.read_text())
    assert blocks
    for block in blocks:
        assert block.lang == "bash", f"{block}: write shell commands as ```bash (python as a heredoc in bash)"
        assert block.marker is not None, (f"{block} has no marker: put <!-- tested: ... --> or "
                                          "<!-- not tested: REASON --> on the line before it")
        assert block.note, f"{block}: say why (or how) in the marker"
        if block.marker == "tested":
            assert "8000" not in block.code or is_server(block) or SERVER_OF.search(block.note), \
                f"{block} calls port 8000 but names no server to run against"
    assert any(b.marker == "tested" for b in blocks)


def is_server(block: Block) -> bool:
    return block.marker == "tested" and "a server" in block.note


def server_command(code: str, port: int) -> str:
    command = " ".join(line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    command = command.split(" #")[0].strip()
    assert "\n" not in command and ";" not in command, f"one command per server block: {code!r}"
    if command.startswith("make serve"):
        assert "PORT=" not in command
        return command.replace("make serve", "make -o .venv/.installed serve", 1) + f" PORT={port}"
    assert "--port 8000" in command, f"a server command takes --port 8000 (the test moves it): {command}"
    return command.replace("--port 8000", f"--port {port}")


def for_port(code: str, port: int, ray_address: str | None) -> str:
    code = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", rf"\1:{port}", code)
    if ray_address is not None:
        code = re.sub(r'ray\.init\(address="[^"]*"\)', f'ray.init(address="{ray_address}")', code)
    for host in re.findall(r"https?://([^/:\s\"']+)", code):
        assert host in ("127.0.0.1", "localhost"), f"a README command addresses {host}"
    return code


def expected_outputs(code: str) -> list[str]:
    """Comment lines that are JSON: what the command before them prints."""
    found = []
    for line in code.splitlines():
        text = line.strip()[1:].strip() if line.strip().startswith("#") else ""
        if text.startswith("{"):
            try:
                json.loads(text)
            except ValueError:
                continue
            found.append(text)
    return found


def working_copy(tmp: Path) -> Path:
    work = tmp / "clone"
    work.mkdir()
    venv = ROOT / ".venv" if (ROOT / ".venv").is_dir() else Path(sys.prefix)
    (work / ".venv").symlink_to(venv)
    for name in ("Makefile", "pyproject.toml", "README.md", "tests", "scripts", "moe_cluster"):
        (work / name).symlink_to(ROOT / name)
    for name in ("deployments", "k8s"):
        shutil.copytree(ROOT / name, work / name)
    return work


class Server:
    def __init__(self, block: Block, command: str, cwd: Path, env: dict, log_path: Path):
        self.block, self.command, self.log_path = block, command, log_path
        self.log = open(log_path, "w+")
        self.process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> str:
        """The Ray address of the banner, once the server says it is ready."""
        def ready():
            assert self.process.poll() is None, f"{self.block}: `{self.command}` exited:\n{self.text()[-4000:]}"
            return re.search(r"moe-cluster: Ray cluster at (\S+);", self.text())
        found = wait_until(ready, timeout=READY_TIMEOUT_S, interval=1.0, what=f"`{self.command}` ready")
        assert "moe-cluster: ready in" in self.text()
        return found.group(1)

    def stop(self) -> None:
        """SIGTERM by PID to `moe-cluster serve` (under make: make's child, since make does not pass a
        SIGTERM on), which shuts its Ray cluster down; then make ends on its own."""
        if self.command.startswith("make ") and self.process.poll() is None:
            for pid in children(self.process.pid):
                os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        stop_process(self.process)
        self.log.close()


def run_block(block: Block, code: str, cwd: Path, env: dict) -> str:
    prelude = "set -eo pipefail\ncurl() { command curl --fail-with-body \"$@\"; }\n"
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    print(f"{block}: {time.monotonic() - started:.1f}s")
    assert done.returncode == 0, (f"{block} failed ({done.returncode}):\n{code}\n--- stdout\n{done.stdout[-3000:]}"
                                  f"\n--- stderr\n{done.stderr[-5000:]}")
    for output in expected_outputs(code):
        assert output in done.stdout, f"{block}: expected {output} in its output, got:\n{done.stdout[-3000:]}"
    return done.stdout


def test_the_readme_blocks_run_as_written(tmp_path):
    blocks = [b for b in readme_blocks(README.read_text()) if b.marker == "tested"]
    cwd = working_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    server, port, address = None, None, None
    started = time.monotonic()
    try:
        for block in blocks:
            if is_server(block):
                if server is not None:
                    server.stop()
                port = free_port()
                server = Server(block, server_command(block.code, port), cwd, env, tmp_path / f"serve-{block.line}.log")
                ready_from = time.monotonic()
                address = server.wait_ready()
                print(f"{block}: `{server.command}` ready in {time.monotonic() - ready_from:.1f}s")
                continue
            wanted = SERVER_OF.search(block.note)
            if wanted:
                assert server is not None and wanted.group(1) in server.block.code, \
                    f"{block} needs the server of {wanted.group(1)!r}, but the one running is {server and server.command}"
                code = for_port(block.code, port, address)
            else:
                assert "8000" not in block.code, f"{block} calls port 8000 but names no server"
                code = block.code
            run_block(block, code, cwd, env)
    finally:
        if server is not None:
            server.stop()
    print(f"all README blocks: {time.monotonic() - started:.0f}s")
