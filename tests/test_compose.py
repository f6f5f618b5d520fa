"""docker-compose.yml, checked without Docker: every command in it is a valid invocation of our CLI
and every environment variable is one that kvstore reads, with a value that loads.

No engine runs here, so the checker does what the containers would do up to the point where
they would start working:

* A command is the image's entrypoint (``ENTRYPOINT`` of the Dockerfile, ``kvstore``) followed by
  the service's ``command``. It runs through the real click group (``main.main``, with the service's
  environment, since click options read ``envvar``\\s from it) with every command body replaced by
  a recorder: the subcommand must exist, every option and argument must parse and convert, option
  callbacks run (``--server`` must be HOST:PORT), and the body must be reached (``--help`` or
  ``--version`` would exit before it and are rejected).
* ``click.Path(exists=True)`` is relaxed to ``exists=False`` while parsing: those paths name files
  inside the container (a mounted model, a CA file), which this machine does not have. Their
  existence is the container's business; everything else about them still parses.
* ``serve`` then runs its real body up to ``asyncio.run(_serve(cfg))``: ``_serve`` is replaced, so
  the ``StoreConfig`` it would serve (defaults < KVSTORE_* env < flags) is built by our own code and
  checked (G3 on a named volume, G4 at the redis service, ``shm_size`` above G2, ...).
* An environment variable must be read by a kvstore process of the service: an ``envvar`` of a
  click option of its command or of its healthcheck's kvstore commands, or, for commands that
  call ``load_config`` (those with ``--config``), a ``KVSTORE_<SECTION>_<FIELD>`` that
  ``load_config`` looks up. That set is recorded from ``load_config`` itself and cross-checked
  against the config dataclasses; nothing here is a hand-written list of names.
* Healthchecks: ``CMD`` lists, and ``CMD-SHELL`` strings split at ``|``, ``&&``, ``||`` and ``;``;
  every ``kvstore ...`` part is checked like a command, in the service's environment.

``problems(document)`` returns every finding as text; the compose file must have none, and
deliberately broken copies of it must each produce the expected one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
import shlex
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml

import kvstore.cli.serve
from kvstore.cli import main
from kvstore.config import StoreConfig, load_config
from kvstore.core.errors import KVStoreError
from kvstore.worker.model import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICES = ("redis", "kvstore", "worker")


# What the shell puts for a word that is one variable, in a healthcheck run in the container.
_SHELL_VALUES = {"${HOSTNAME}": "container-hostname", "$HOSTNAME": "container-hostname"}


class ComposeProblem(Exception):
    """One thing wrong with the compose document; its text says what and where."""


# -- reading the compose file --------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys: PyYAML keeps the last one, compose refuses them."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ComposeProblem(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def load_compose(text: str) -> dict[str, Any]:
    document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    assert isinstance(document, dict), "the compose file must be a mapping"
    return document


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return load_compose(COMPOSE_FILE.read_text())


def _literal(value: Any, where: str) -> str:
    """A compose string as the container sees it: ``$$`` is a literal ``$``; any other ``$`` is
    interpolated from the environment of ``docker compose``, which this test cannot know."""
    if not isinstance(value, str):
        raise ComposeProblem(
            f"{where}: {value!r} is a YAML {type(value).__name__}; quote it (compose wants strings "
            "here, and YAML turns yes/no/on/off into booleans)"
        )
    if "$" in value.replace("$$", ""):
        raise ComposeProblem(f"{where}: {value!r} uses compose interpolation; write $$ for a $")
    return value.replace("$$", "$")


def _argv(value: Any, where: str) -> list[str]:
    """``command`` / ``entrypoint``: a list, or a string that compose splits like a shell."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(_literal(value, where))
    if isinstance(value, list):
        return [_literal(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ComposeProblem(f"{where}: must be a string or a list, not {type(value).__name__}")


def _environment(service: Mapping[str, Any], where: str) -> dict[str, str | None]:
    """``environment``, a mapping or a KEY=VALUE list. ``None``: a bare ``KEY`` (or ``KEY:``),
    passed through from the environment of ``docker compose``; only its name can be checked."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs: dict[str, Any] = {}
        for item in raw:
            key, sep, value = str(item).partition("=")
            pairs[key] = value if sep else None
        raw = pairs
    if not isinstance(raw, dict):
        raise ComposeProblem(f"{where}.environment: must be a mapping or a list")
    return {
        key: None if value is None else _literal(value, f"{where}.environment.{key}")
        for key, value in raw.items()
    }


def _docker_bytes(value: Any, where: str) -> int:
    """``shm_size`` as docker reads it: a number of bytes, or 64m / 2g / 3gb / 4GiB (binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ComposeProblem(f"{where}: {value!r} is not a size docker understands")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgtp".index(unit.lower() or " "))


# -- the image -----------------------------------------------------------------------------------


def _build_dir(service: Mapping[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    context = build.get("context", ".") if isinstance(build, dict) else build
    return (ROOT / str(context)).resolve()


def _uses_our_image(service: Mapping[str, Any]) -> bool:
    return _build_dir(service) == ROOT


def image_entrypoint(dockerfile: Path) -> list[str]:
    """The exec-form ENTRYPOINT of a Dockerfile (the last one wins, as docker does)."""
    entrypoint: list[str] = []
    for line in dockerfile.read_text().splitlines():
        if line.strip().upper().startswith("ENTRYPOINT"):
            words = json.loads(line.strip()[len("ENTRYPOINT") :])
            assert isinstance(words, list), f"{dockerfile}: use the exec form of ENTRYPOINT"
            entrypoint = [str(w) for w in words]
    return entrypoint


# -- the CLI, parsed but not run -----------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """A command line the real CLI accepted: which command, and its converted parameters."""

    args: tuple[str, ...]
    command: click.Command
    params: dict[str, Any]

    @property
    def reads_config(self) -> bool:
        # The commands that call load_config are the ones that take --config (KVSTORE_CONFIG).
        return any(p.name == "config_path" for p in self.command.params)

    @property
    def envvars(self) -> set[str]:
        """The environment variables this command's options read (click ``envvar``)."""
        names: set[str] = set()
        for param in [*main.params, *self.command.params]:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        return names


def _commands(group: click.Group) -> Iterator[click.Command]:
    for command in group.commands.values():
        yield command
        if isinstance(command, click.Group):
            yield from _commands(command)


@contextlib.contextmanager
def _container_env(env: Mapping[str, str]) -> Iterator[pytest.MonkeyPatch]:
    """This process's environment as the container's, as far as kvstore reads it."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("KVSTORE_"):
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        yield mp


def _run_cli(
    args: list[str], env: Mapping[str, str], *, keep_body: str | None = None
) -> tuple[click.Command, dict[str, Any]]:
    """``kvstore *args`` through the real click group, every command body but ``keep_body``
    replaced by a recorder; returns the command reached and its parameters."""
    reached: list[tuple[click.Command, dict[str, Any]]] = []

    def recorder(command: click.Command, body: Callable[..., Any] | None) -> Callable[..., Any]:
        def record(*args: Any, **params: Any) -> Any:
            reached.append((command, params))
            if body is not None:
                return body(*args, **params)
            return None

        return record

    with _container_env(env) as mp:
        for command in _commands(main):
            if isinstance(command, click.Group):
                continue
            for param in command.params:
                if isinstance(param.type, click.Path) and param.type.exists:
                    mp.setattr(param.type, "exists", False)  # a path in the container
            body = command.callback if command.name == keep_body else None
            mp.setattr(command, "callback", recorder(command, body))
        where = f"`kvstore {shlex.join(args)}`"
        try:
            main.main(args=list(args), prog_name="kvstore", standalone_mode=False)
        except click.ClickException as exc:
            raise ComposeProblem(f"{where}: {exc.format_message()}") from None
    if len(reached) != 1:
        raise ComposeProblem(f"{where} would exit without running a command (--help? --version?)")
    return reached[0]


def parse_cli(args: list[str], env: Mapping[str, str]) -> Invocation:
    """Parse ``kvstore *args`` as the CLI would in an environment ``env``; run no command."""
    command, params = _run_cli(args, env)
    return Invocation(tuple(args), command, params)


def serve_config(args: list[str], env: Mapping[str, str]) -> StoreConfig:
    """The ``StoreConfig`` that ``kvstore *args`` (a ``serve``) would serve: the real command body,
    with the server itself (``_serve``) replaced."""
    served: list[StoreConfig] = []

    async def capture(cfg: StoreConfig) -> None:
        served.append(cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kvstore.cli.serve, "_serve", capture)
        mp.setattr(logging, "basicConfig", lambda **kwargs: None)
        _run_cli(args, env, keep_body="serve")
    if len(served) != 1:
        raise ComposeProblem(f"`kvstore {shlex.join(args)}` would not start serving")
    return served[0]


class _ReadRecorder(Mapping[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def config_env_names() -> frozenset[str]:
    """Every environment variable ``load_config`` reads, as it reads them."""
    recorder = _ReadRecorder()
    load_config(None, env=recorder)
    return frozenset(recorder.read)


def _health_kvstore_commands(test: Any, where: str) -> list[list[str]]:
    """The argument lists of the ``kvstore`` commands a healthcheck ``test`` runs."""
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not isinstance(test, list) or not test:
        raise ComposeProblem(f"{where}: must be a list or a string")
    kind = test[0]
    words = [_literal(item, f"{where}[{i + 1}]") for i, item in enumerate(test[1:])]
    if kind == "CMD":
        parts = [words]
    elif kind == "CMD-SHELL":
        if len(words) != 1:
            raise ComposeProblem(f"{where}: CMD-SHELL takes one string")
        lexer = shlex.shlex(words[0], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts = [[]]
        for token in lexer:
            if token in ("|", "||", "&&", ";", "&"):
                parts.append([])
            else:
                parts[-1].append(token)
    else:
        raise ComposeProblem(f"{where}: {kind!r} checks nothing (use CMD or CMD-SHELL)")
    commands = []
    for part in parts:
        if part and part[0] == "kvstore":
            # A whole word that is one variable (the container's ${HOSTNAME}) is filled in as
            # the shell would; anything else with $ or shell syntax cannot be checked.
            part = [_SHELL_VALUES.get(w, w) for w in part]
            odd = [w for w in part if "$" in w or set(w) <= set("();<>|&")]
            if odd:
                raise ComposeProblem(f"{where}: cannot check the shell words {odd} of {part}")
            commands.append(part[1:])
    return commands


# -- one service of ours -------------------------------------------------------------------------


@dataclass
class ServiceCheck:
    """What the checker found out about one service that runs our image."""

    name: str
    env: dict[str, str | None] = field(default_factory=dict)
    invocation: Invocation | None = None
    config: StoreConfig | None = None
    health: list[Invocation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        try:
            yield
        except (ComposeProblem, KVStoreError) as exc:  # KVStoreError: ConfigError of a value
            self.problems.append(f"{self.name}: {exc}")


def check_service(name: str, service: Mapping[str, Any]) -> ServiceCheck:
    check = ServiceCheck(name)
    where = f"services.{name}"
    with check.step():
        check.env = _environment(service, where)
    env = {k: v for k, v in check.env.items() if v is not None}

    with check.step():
        if "entrypoint" in service:
            entrypoint = _argv(service["entrypoint"], f"{where}.entrypoint")
        else:
            build = service["build"]
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else None
            entrypoint = image_entrypoint(ROOT / (dockerfile or "Dockerfile"))
        argv = entrypoint + _argv(service.get("command"), f"{where}.command")
        if argv[:1] != ["kvstore"]:
            raise ComposeProblem(f"runs {argv}, not kvstore")
        check.invocation = parse_cli(argv[1:], env)
        if check.invocation.command.name == "serve":
            check.config = serve_config(argv[1:], env)
        elif check.invocation.reads_config:
            with _container_env(env):
                check.config = load_config(None)
        if check.invocation.command.name == "worker":
            params = check.invocation.params
            # model_dir is a path in the container; WorkerConfig would look for it here.
            WorkerConfig(
                seed=params["seed"],
                dtype=params["dtype"],
                block_tokens=params["block_tokens"],
                device=params["device"],
            )
    with check.step():
        healthcheck = service.get("healthcheck")
        if not healthcheck or healthcheck.get("disable") or "test" not in healthcheck:
            raise ComposeProblem("has no healthcheck")
        commands = _health_kvstore_commands(healthcheck["test"], f"{where}.healthcheck.test")
        if not commands:
            raise ComposeProblem("its healthcheck does not ask kvstore anything")
        for args in commands:
            check.health.append(parse_cli(args, env))

    # Only now is it known which kvstore processes run with this environment (unless the command
    # itself did not parse: that problem is reported already, and would make every one of its
    # variables look unread).
    if check.invocation is None:
        return check
    readers = [check.invocation, *check.health]
    known = set().union(*(i.envvars for i in readers))
    if any(i.reads_config for i in readers):
        known |= config_env_names()
    for key in sorted(set(check.env) - known):
        check.problems.append(
            f"{name}: environment variable {key} is read by none of "
            f"{sorted({i.command.name or '?' for i in readers})}"
        )
    return check


# -- the whole document --------------------------------------------------------------------------


def _named_volume_targets(
    service: Mapping[str, Any], declared: Mapping[str, Any]
) -> list[PurePosixPath]:
    targets = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type", "volume") == "volume" and volume.get("source") in declared:
                targets.append(PurePosixPath(volume["target"]))
        else:
            source, _, rest = str(volume).partition(":")
            if source in declared and rest:
                targets.append(PurePosixPath(rest.split(":")[0]))
    return targets


def _on_named_volume(path: str, service: Mapping[str, Any], declared: Mapping[str, Any]) -> bool:
    return any(
        PurePosixPath(path).is_relative_to(target)
        for target in _named_volume_targets(service, declared)
    )


def _healthy_dependency(service: Mapping[str, Any], on: str) -> bool:
    depends = service.get("depends_on") or {}
    return (
        isinstance(depends, dict) and (depends.get(on) or {}).get("condition") == "service_healthy"
    )


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def problems(doc: Mapping[str, Any]) -> list[str]:
    """Everything wrong with a compose document, as text (nothing: an empty list)."""
    found: list[str] = []
    services: Mapping[str, Any] = doc.get("services") or {}
    declared: Mapping[str, Any] = doc.get("volumes") or {}
    found += [f"no service {name!r}" for name in SERVICES if name not in services]
    checks = {
        name: check_service(name, service)
        for name, service in services.items()
        if _uses_our_image(service)
    }
    for check in checks.values():
        found += check.problems
    for name, service in services.items():
        if not service.get("restart"):
            found.append(f"{name}: no restart policy")

    redis = services.get("redis") or {}
    redis_test = json.dumps((redis.get("healthcheck") or {}).get("test", ""))
    if "redis-cli ping" not in redis_test and '"redis-cli", "ping"' not in redis_test:
        found.append("redis: the healthcheck must be `redis-cli ping`")
    if not any(str(t) == "/data" for t in _named_volume_targets(redis, declared)):
        found.append("redis: /data (its append-only file) is not on a named volume")
    if "--appendonly" not in _argv(redis.get("command"), "services.redis.command"):
        found.append("redis: no --appendonly: G4 would not survive a Redis restart")

    server = checks.get("kvstore")
    cfg = server.config if server else None
    if server and server.invocation and server.invocation.command.name != "serve":
        found.append("kvstore: must run `kvstore serve`")
    if cfg is not None:
        kvstore_service = services["kvstore"]
        if cfg.g3 is None or not _on_named_volume(cfg.g3.path, kvstore_service, declared):
            found.append(f"kvstore: G3 ({cfg.g3 and cfg.g3.path}) is not on a named volume")
        if cfg.g4 is None or not re.fullmatch(r"redis://redis:6379(/\d+)?", cfg.g4.url):
            found.append(f"kvstore: G4 must be on, at the redis service (got {cfg.g4})")
        if not _healthy_dependency(kvstore_service, "redis"):
            found.append("kvstore: must wait for redis to be healthy (depends_on)")
        try:
            shm = _docker_bytes(kvstore_service.get("shm_size", "64m"), "kvstore.shm_size")
            if shm < cfg.g2.capacity_bytes + (64 << 20):
                found.append(
                    f"kvstore: shm_size ({shm} bytes) must exceed G2's capacity "
                    f"({cfg.g2.capacity_bytes} bytes) by 64 MiB at least: G2 lives in /dev/shm"
                )
        except ComposeProblem as exc:
            found.append(str(exc))
        if not cfg.server.metrics_listen:
            found.append("kvstore: no metrics (server.metrics_listen)")
        listen_port = _port(cfg.server.listen)
        for probe in server.health if server else []:
            if "server" in probe.params and _port(probe.params["server"]) != listen_port:
                found.append(
                    f"kvstore: the healthcheck asks port {probe.params['server']}, "
                    f"the service listens on {cfg.server.listen}"
                )
        worker = checks.get("worker")
        if worker and worker.invocation:
            if worker.invocation.command.name != "worker":
                found.append("worker: must run `kvstore worker`")
            elif worker.invocation.params["server"] != f"kvstore:{listen_port}":
                found.append(
                    f"worker: attaches to {worker.invocation.params['server']}, but the service "
                    f"is kvstore:{listen_port}"
                )
        if not _healthy_dependency(services.get("worker") or {}, "kvstore"):
            found.append("worker: must wait for kvstore to be healthy (depends_on)")
    return found


# -- the tests -----------------------------------------------------------------------------------


def test_the_compose_file_has_no_problems(document: dict[str, Any]) -> None:
    assert problems(document) == []


def test_services_health_checks_and_volumes(document: dict[str, Any]) -> None:
    services = document["services"]
    assert set(SERVICES) <= set(services)
    for name in SERVICES:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert {"kvstore-g3", "redis-data"} <= set(document["volumes"])
    assert "kvstore-g3:/data/g3" in services["kvstore"]["volumes"]
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert services["redis"]["image"].startswith("redis:7")


def test_the_image_entrypoint_is_our_cli(document: dict[str, Any]) -> None:
    # The commands in the compose file are arguments of `kvstore` only because of this.
    assert image_entrypoint(ROOT / "Dockerfile") == ["kvstore"]
    assert [n for n, s in document["services"].items() if _uses_our_image(s)] == [
        "kvstore",
        "worker",
    ]


def test_the_service_serves_what_the_file_says(document: dict[str, Any]) -> None:
    check = check_service("kvstore", document["services"]["kvstore"])
    assert check.problems == []
    assert check.invocation is not None
    assert check.invocation.command.name == "serve"
    cfg = check.config
    assert cfg is not None
    assert cfg.server.listen == "0.0.0.0:50051"
    assert cfg.server.metrics_listen == "0.0.0.0:9464"
    assert cfg.g2.capacity_bytes == 2 << 30
    assert cfg.g3 is not None
    assert cfg.g3.path == "/data/g3"
    assert cfg.g3.capacity_bytes == 50 << 30
    assert cfg.g4 is not None
    assert cfg.g4.url == "redis://redis:6379/0"
    assert cfg.g4.capacity_bytes == 8 << 30  # redis --maxmemory 8gb (binary in Redis)
    assert cfg.g1 is None
    assert [p.command.name for p in check.health] == ["health"]
    assert check.health[0].params["server"] == "127.0.0.1:50051"
    assert check.health[0].params["worker_name"] is None


def test_load_config_reads_the_service_environment(
    document: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = document["services"]["kvstore"]["environment"]
    for key in list(os.environ):
        if key.startswith("KVSTORE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None)
    assert cfg.g4 is not None
    assert cfg.g4.url == "redis://redis:6379/0"
    assert cfg.g3 is not None
    assert cfg.g3.path == "/data/g3"
    assert cfg.server.metrics_listen == "0.0.0.0:9464"
    assert cfg.server.listen == "127.0.0.1:50051"  # the default; the command gives --listen


def test_the_worker_attaches_to_the_service(document: dict[str, Any]) -> None:
    check = check_service("worker", document["services"]["worker"])
    assert check.problems == []
    assert check.invocation is not None
    assert check.invocation.command.name == "worker"
    params = check.invocation.params
    assert params["server"] == "kvstore:50051"  # from KVSTORE_SERVER
    assert params["block_tokens"] == 16  # from KVSTORE_WORKER_BLOCK_TOKENS
    assert (params["dtype"], params["device"], params["model_dir"]) == ("float32", "cpu", None)
    assert check.config is None  # the worker reads no store configuration
    # The healthcheck talks to the same server, from the same environment.
    assert [p.command.name for p in check.health] == ["health"]
    assert check.health[0].params["server"] == "kvstore:50051"
    assert check.health[0].params["worker_name"] == "container-hostname"
    assert document["services"]["worker"]["restart"] == "unless-stopped"


def test_config_env_names_cover_every_config_field() -> None:
    names = config_env_names()
    hints = typing.get_type_hints(StoreConfig)
    expected = set()
    for section in dataclasses.fields(StoreConfig):
        typ = hints[section.name]
        union = typing.get_origin(typ) in (typing.Union, types.UnionType)
        for cls in typing.get_args(typ) if union else (typ,):
            if dataclasses.is_dataclass(cls):
                expected |= {
                    f"KVSTORE_{section.name.upper()}_{f.name.upper()}"
                    for f in dataclasses.fields(cls)
                    if f.init
                }
    assert {"KVSTORE_G3_PATH", "KVSTORE_G4_URL", "KVSTORE_SERVER_METRICS_LISTEN"} <= expected
    assert expected <= names
    assert {"KVSTORE_G4_ENABLED", "KVSTORE_G3_ENABLED"} <= names
    assert "KVSTORE_SERVER" not in names  # a click option's envvar, not configuration


def test_container_paths_need_not_exist_here() -> None:
    worker = next(c for c in main.commands.values() if c.name == "worker")
    model = next(p for p in worker.params if p.name == "model_dir")
    assert isinstance(model.type, click.Path)
    assert model.type.exists
    args = ["worker", "--model", "/models/not-on-this-machine"]
    assert parse_cli(args, {}).params["model_dir"] == "/models/not-on-this-machine"
    assert model.type.exists  # relaxed only while parsing
    with pytest.raises(click.BadParameter, match="does not exist"):  # as the real CLI here
        worker.make_context("worker", args[1:])
    with pytest.raises(ComposeProblem, match="--dtype"):
        parse_cli(["worker", "--dtype", "float64"], {})


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = doc
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()
_HEALTH_SHELL = 'kvstore health --timeout 10 --wroker "$${HOSTNAME}"'


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            _set("services/kvstore/command", ["kvstore", "serve", "--listen", "0.0.0.0:50051"]),
            "No such command 'kvstore'",
            id="command-repeats-the-entrypoint",
        ),
        pytest.param(
            _set("services/kvstore/command", "serve --port 50051"),
            "No such option '--port'",
            id="unknown-option",
        ),
        pytest.param(
            _set("services/kvstore/command", ["serve", "--listen", "0.0.0.0:50051", "--help"]),
            "would exit without running",
            id="help-runs-nothing",
        ),
        pytest.param(
            _set("services/kvstore/command", ["serve", "--set", "g3.pathh=/data/g3"]),
            "unknown settings ['pathh']",
            id="bad-set-override",
        ),
        pytest.param(
            _set("services/kvstore/command", ["serve", "--listen", "$HOST:50051"]),
            "interpolation",
            id="compose-interpolation",
        ),
        pytest.param(
            _set("services/worker/command", ["worker", "--dtype", "float64"]),
            "'float64' is not one of",
            id="bad-choice",
        ),
        pytest.param(
            _set("services/worker/command", ["worker", "--device", "gpu0"]),
            "worker.device 'gpu0'",
            id="bad-worker-device",
        ),
        pytest.param(
            _set("services/kvstore/environment/KVSTORE_G4_URI", "redis://redis:6379/0"),
            "KVSTORE_G4_URI is read by none",
            id="misspelt-config-variable",
        ),
        pytest.param(
            _set("services/kvstore/environment/KVSTORE_G3_CAPACITY_BYTES", "lots"),
            "'lots' is not a size",
            id="config-value-that-does-not-load",
        ),
        pytest.param(
            _set("services/kvstore/environment/KVSTORE_G4_ENABLED", True),
            "quote it",
            id="unquoted-boolean",
        ),
        pytest.param(
            _set("services/kvstore/environment/KVSTORE_G4_ENABLED", "false"),
            "G4 must be on",
            id="g4-off",
        ),
        pytest.param(
            _set("services/worker/environment/KVSTORE_G4_URL", "redis://redis:6379/0"),
            "KVSTORE_G4_URL is read by none of ['health', 'worker']",
            id="config-variable-on-a-command-without-config",
        ),
        pytest.param(
            _set(
                "services/worker/environment",
                ["KVSTORE_SERVER=kvstore:50051", "KVSTORE_WORKER_BLOCKTOKENS=16"],
            ),
            "KVSTORE_WORKER_BLOCKTOKENS is read by none",
            id="misspelt-variable-in-list-form",
        ),
        pytest.param(
            _set("services/worker/environment/KVSTORE_WORKER_BLOCK_TOKENS", "0"),
            "--block-tokens",
            id="click-envvar-value-out-of-range",
        ),
        pytest.param(
            _set("services/worker/environment/KVSTORE_SERVER", "kvstore:50052"),
            "worker: attaches to kvstore:50052",
            id="worker-on-the-wrong-port",
        ),
        pytest.param(
            _set("services/kvstore/healthcheck/test", ["CMD", "kvstore", "tier", "--json"]),
            "No such command 'tier'",
            id="healthcheck-typo",
        ),
        pytest.param(
            _set(
                "services/kvstore/healthcheck/test",
                ["CMD", "kvstore", "tiers", "--server", "127.0.0.1:50052"],
            ),
            "the healthcheck asks port",
            id="healthcheck-on-the-wrong-port",
        ),
        pytest.param(
            _set("services/worker/healthcheck/test", ["CMD-SHELL", _HEALTH_SHELL]),
            "No such option '--wroker'",
            id="shell-healthcheck-typo",
        ),
        pytest.param(
            _set("services/worker/healthcheck/test", ["CMD-SHELL", "pgrep kvstore"]),
            "does not ask kvstore",
            id="healthcheck-without-kvstore",
        ),
        pytest.param(
            _set("services/worker/healthcheck", _DELETE),
            "worker: has no healthcheck",
            id="no-healthcheck",
        ),
        pytest.param(_set("services/kvstore/shm_size", "64m"), "shm_size", id="shm-too-small"),
        pytest.param(
            _set("services/kvstore/volumes", _DELETE),
            "G3 (/data/g3) is not on a named",
            id="g3-not-on-a-volume",
        ),
        pytest.param(
            _set("services/redis/volumes", _DELETE), "redis: /data", id="redis-without-volume"
        ),
        pytest.param(
            _set("services/kvstore/depends_on", ["redis"]),
            "wait for redis",
            id="no-healthy-dependency",
        ),
        pytest.param(
            _set("services/worker/restart", _DELETE),
            "worker: no restart policy",
            id="no-restart-policy",
        ),
    ],
)
def test_the_checker_rejects_a_broken_copy(
    document: dict[str, Any], edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(document)
    edit(broken)
    found = problems(broken)
    assert any(expected in p for p in found), found


def test_list_form_and_passed_through_variables(document: dict[str, Any]) -> None:
    worker = copy.deepcopy(document["services"]["worker"])
    # A bare name is taken from the environment of `docker compose`: its name is still checked.
    worker["environment"] = ["KVSTORE_SERVER=kvstore:50051", "KVSTORE_TOKEN"]
    check = check_service("worker", worker)
    assert check.problems == []
    assert check.env == {"KVSTORE_SERVER": "kvstore:50051", "KVSTORE_TOKEN": None}
    assert check.invocation is not None
    assert check.invocation.params["block_tokens"] == 16  # the option's default now


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ComposeProblem, match="duplicate key 'KVSTORE_G3_PATH'"):
        load_compose("environment:\n  KVSTORE_G3_PATH: /a\n  KVSTORE_G3_PATH: /b\n")


def test_serve_config_runs_the_real_command_body() -> None:
    # The flags win over the environment, as in `kvstore serve`; no server starts.
    env = {"KVSTORE_G3_PATH": "/data/g3", "KVSTORE_SERVER_LISTEN": "0.0.0.0:1"}
    cfg = serve_config(["serve", "--listen", "0.0.0.0:2", "--g4-url", "redis://r:1/0"], env)
    assert cfg.server.listen == "0.0.0.0:2"
    assert cfg.g4 is not None
    assert cfg.g4.url == "redis://r:1/0"
    with pytest.raises(ComposeProblem, match=r"server\.listen must be host:port"):
        serve_config(["serve", "--listen", "nowhere"], env)
    assert asyncio.iscoroutinefunction(kvstore.cli.serve._serve)  # restored afterwards
