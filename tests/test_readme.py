"""Every Python and shell snippet of README.md runs here, exactly as written.

Each fenced ```python / ```bash block of the README is preceded by a marker comment (invisible
on GitHub) that says how it runs, `<!-- readme-test: KIND [key=value ...] -->`:

- `python`: the block runs as a script in a fresh interpreter from an empty temporary folder
  outside the repository (the installed project must work from any folder). Any exception
  (a NameError included) fails the test.
- `bash`: the block runs under `bash -eu` from an empty temporary folder, or from the
  repository root with `cwd=repo`; any failing command fails the test.
- `server name=NAME ready=URL`: a long-running command (`serve run ...`), started from the
  repository root in the background in its own process group, waited for until URL answers 200,
  then every `client` block is run against it, then it is stopped with Ctrl-C (SIGINT) like a
  user would, and killed (its process group only) if it does not exit.
- `client [of=NAME]`: a Python block sent to each running server (or only to server NAME).
- `marks=a,b` (any kind): the suite's pytest markers (`vllm`, `default_model`, `ray`), so that
  `make test-fast` leaves out the snippets that start vLLM or load the real model.
- `make-dry-run`: `make demo` / `make test` install everything and run the whole suite, which
  cannot run inside the suite; each `make TARGET` line is checked with `make -n TARGET`.

A block without a marker, or with an unknown one, fails `test_every_snippet_has_a_runner`, so no
snippet goes untested.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\S*)")
SNIPPET_LANGUAGES = {"python", "py", "bash", "sh", "shell", "console", "zsh"}
KINDS = {"python", "bash", "server", "client", "make-dry-run"}
SNIPPET_TIMEOUT_S = 420  # one snippet (a vLLM engine start is 1-3 minutes on 2 shared cores)
SERVER_READY_TIMEOUT_S = 480
SERVER_STOP_TIMEOUT_S = 60
LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
             "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Snippet:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    kind: str | None
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"README.md:{self.line}:{self.kind}"


def parse_readme(text: str) -> list[Snippet]:
    """Every fenced block in a snippet language, with the marker on the line before it (blank
    lines between the two allowed)."""
    snippets, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        language, start = opening.group(1).lower(), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        i = end + 1
        if language not in SNIPPET_LANGUAGES:
            continue
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before.strip())
        kind, options = None, {}
        if marker:
            words = shlex.split(marker.group(1))
            kind = words[0] if words else None
            options = dict(word.split("=", 1) for word in words[1:])
        code = "\n".join(lines[start + 1:end]) + "\n"
        snippets.append(Snippet(start + 1, language, code, kind, options))
    return snippets


SNIPPETS = parse_readme(README.read_text())


def of_kind(*kinds: str) -> list[Snippet]:
    return [s for s in SNIPPETS if s.kind in kinds]


def params(snippets: list[Snippet], name=lambda s: s.name) -> list:
    """The snippets as test cases, with the suite's markers they name (`marks=vllm,ray`), so
    `make test-fast` leaves out the ones that start vLLM or load the real model."""
    return [pytest.param(s, id=name(s), marks=[getattr(pytest.mark, m) for m in s.options.get("marks", "").split(",") if m])
            for s in snippets]


def snippet_env(uses_ray_address: bool) -> dict:
    """The user's environment plus the local settings the Makefile exports. PYTHONPATH goes so
    the snippets import the installed project, not the checkout by accident. Servers and Python
    snippets get RAY_ADDRESS=local, so `serve run` and Ray Data start a Ray of their own instead
    of joining one that another process here started with `ray start`; the job CLI keeps its own
    choice (it starts a local Ray when RAY_ADDRESS is unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")} | LOCAL_ENV
    if uses_ray_address:
        env["RAY_ADDRESS"] = "local"
    return env


def run_checked(args: list[str], cwd: Path, env: dict, what: str, timeout_s: float = SNIPPET_TIMEOUT_S):
    try:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} ran past {timeout_s} s; output so far:\n{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}")
    assert done.returncode == 0, (f"{what} failed (exit {done.returncode}):\n--- stdout\n{done.stdout[-4000:]}"
                                  f"\n--- stderr\n{done.stderr[-6000:]}")
    return done


def run_python(snippet: Snippet, folder: Path) -> subprocess.CompletedProcess:
    script = folder / f"readme_snippet_{snippet.line}.py"
    script.write_text(snippet.code)
    return run_checked([sys.executable, script.name], folder, snippet_env(True), snippet.name)


def run_bash(snippet: Snippet, folder: Path) -> subprocess.CompletedProcess:
    cwd = REPO_ROOT if snippet.options.get("cwd") == "repo" else folder
    # -e: any failing command fails the snippet. No pipefail: `gunzip -c ... | head` is fine in a
    # user's shell, though gunzip ends on SIGPIPE there.
    return run_checked(["bash", "-eu", "-c", snippet.code], cwd, snippet_env(False), snippet.name)


# ---- the README's structure --------------------------------------------------------------------
def test_every_snippet_has_a_runner():
    assert SNIPPETS, "no snippets found in README.md"
    unknown = [s.name for s in SNIPPETS if s.kind not in KINDS]
    assert unknown == [], f"snippets without a known <!-- readme-test: KIND --> marker: {unknown}"
    wrong_language = [s.name for s in SNIPPETS if s.kind in ("python", "client") and s.language not in ("python", "py")]
    wrong_language += [s.name for s in SNIPPETS if s.kind in ("bash", "server", "make-dry-run") and s.language in ("python", "py")]
    assert wrong_language == []
    servers = {s.options.get("name") for s in of_kind("server")}
    assert None not in servers and all(s.options.get("ready") for s in of_kind("server"))
    for client in of_kind("client"):
        assert client.options.get("of", next(iter(servers), None)) in servers, client.name
    for server in servers:
        assert clients_of(server), f"server {server} has no client snippet"


def test_readme_is_short_and_keeps_the_maintainers_places():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "<!-- reliability: filled in by the maintainer -->" in text or "## Reliability and security" in text
    for target in re.findall(r"\]\(((?:docs|reports|jobs|data)/[^)#\s]+)", text):
        assert (REPO_ROOT / target).exists(), f"README links to {target}, which does not exist"


# ---- the snippets --------------------------------------------------------------------------------
@pytest.mark.parametrize("snippet", params(of_kind("make-dry-run")))
def test_make_targets_resolve(snippet):
    """`make demo` and `make test` install and run the whole suite: checked with `make -n` only."""
    targets = [line.split("#", 1)[0].split()[1] for line in snippet.code.splitlines()
               if line.strip().startswith("make ")]
    assert targets
    for target in targets:
        done = run_checked(["make", "-n", target], REPO_ROOT, snippet_env(False), f"make -n {target}", 60)
        assert done.stdout.strip(), f"make -n {target} printed nothing"


@pytest.mark.parametrize("snippet", params(of_kind("python", "bash")))
def test_snippet_runs_as_written(snippet, tmp_path):
    try:
        done = (run_python if snippet.kind == "python" else run_bash)(snippet, tmp_path)
    finally:
        if snippet.options.get("cwd") == "repo":  # what a repo-root snippet wrote under runs/ (ignored by git)
            for path in sorted(set(re.findall(r"\bruns/[\w.-]+", snippet.code))):
                shutil.rmtree(REPO_ROOT / path, ignore_errors=True)
    # The exit status is the verdict (an exception exits 1): Ray's own workers log tracebacks of
    # errors they recover from (e.g. Ray Data's stats actor), which fail nothing.
    assert done.returncode == 0


def clients_of(server_name: str) -> list[Snippet]:
    return [c for c in of_kind("client") if c.options.get("of", server_name) == server_name]


def port_of(url: str) -> int:
    return int(re.match(r"https?://[^:/]+:(\d+)", url).group(1))


def is_port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}) before it was ready:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200 and is_serving(response.read()):
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    pytest.fail(f"{url} not ready after {SERVER_READY_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")


def is_serving(body: bytes) -> bool:
    """A model list answers 200 before any model is up (Ray Serve LLM's ingress starts first):
    ready means a non-empty list."""
    try:
        data = json.loads(body)
    except ValueError:
        return True
    return not isinstance(data, dict) or "data" not in data or bool(data["data"])


def default_sigint() -> None:
    """In the server's process, before exec: Ctrl-C back to its default. A command started in the
    background by a non-interactive shell inherits SIGINT ignored, and `serve run` would then
    never see the Ctrl-C that shuts it down cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops `serve run` (it shuts Serve and its Ray down); then, only if it
    hangs, its own process group."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@pytest.mark.parametrize("server", params(of_kind("server"), name=lambda s: s.options.get("name", s.name)))
def test_server_answers_the_client_snippets(server, tmp_path):
    url = server.options["ready"]
    port = port_of(url)
    assert is_port_free(port), f"port {port} is taken by another process: the README's server needs it"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(["bash", "-c", server.code], cwd=REPO_ROOT, env=snippet_env(True),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=default_sigint)
    try:
        wait_ready(process, url, log)
        for client in clients_of(server.options["name"]):
            done = run_python(client, tmp_path)
            assert done.stdout.strip(), f"{client.name} printed nothing"
    finally:
        stop(process)
    assert is_port_free(port) or wait_port_free(port), f"port {port} still answers after the server stopped"


def wait_port_free(port: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_port_free(port):
            return True
        time.sleep(1)
    return False
