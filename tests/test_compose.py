"""The deployment files (docker/, mlflow/), checked where no Docker engine runs.

The compose file is interpolated as Compose does and validated against the Compose
specification's JSON schema (docker/compose-spec/); every file, image stage, module and command
it names must exist; secrets come only from docker/.env; the images install with install.sh,
the script the README's `make` runs; mlflow/start-server.sh builds a command MLflow accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
IMAGE_ROOT = "/opt/sae-pipeline"  # the repository's place in the images (WORKDIR)

SERVICES = {
    "postgres",
    "redis",
    "mlflow",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker-cpu",
    "airflow-worker-gpu-0",
    "airflow-worker-gpu-1",
    "encoder-service",
}
WORKERS = {
    "airflow-worker-cpu": "default",
    "airflow-worker-gpu-0": "gpu",
    "airflow-worker-gpu-1": "gpu",
}
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
SECRET = re.compile(r"(PASSWORD|SECRET|_KEY)$|^REDISCLI_AUTH$")

# Compose interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
# ${VAR?error}, ${VAR:+replacement}, ${VAR+replacement}.
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})"
)


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["bare"] or m["name"]
        value, op, arg = env.get(name), m["op"] or "", m["arg"] or ""
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset else value
        if op.endswith("?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op.endswith("+"):
            return "" if unset else arg
        return value or ""

    return _VAR.sub(substitute, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the << merge keys, as Compose does


def filled_env() -> dict[str, str]:
    """docker/.env.example with a placeholder in every value left for the operator to fill."""
    return {k: v or f"test-{k.lower()}" for k, v in read_env_file(DOCKER / ".env.example").items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate_tree(raw_compose(), filled_env())


def variables_in(node: Any) -> set[str]:
    text = json.dumps(node)
    return {m["bare"] or m["name"] for m in _VAR.finditer(text) if not m["escaped"]}


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def invocations(service: dict[str, Any], program: str) -> list[list[str]]:
    """Every ``program ...`` argv in a service's command and healthcheck, shell forms included."""
    found = []
    lines = [command_of(service)]
    test = service.get("healthcheck", {}).get("test", [])
    if test[:1] == ["CMD-SHELL"]:
        lines.append(["sh", "-c", test[1]])
    elif test[:1] == ["CMD"]:
        lines.append(test[1:])
    for argv in lines:
        if argv[:1] in (["bash"], ["sh"]) and "-c" in argv:
            lexer = shlex.shlex(argv[argv.index("-c") + 1], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token in ("&&", "||", ";", "|"):
                    words = words[1:] if words[:1] == ["exec"] else words
                    if words[:1] == [program]:
                        found.append(words[1:])
                    words = []
                else:
                    words.append(token)
        elif argv[:1] == [program]:
            found.append(argv[1:])
    return found


# ---- the compose file is valid --------------------------------------------------------------
def test_compose_file_is_valid_against_the_compose_specification(compose):
    import jsonschema

    schema = json.loads((DOCKER / "compose-spec" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_schema_check_rejects_a_broken_compose_file(compose):
    import jsonschema

    schema = json.loads((DOCKER / "compose-spec" / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["airflow-worker-gpu-0"]["deploy"]["resources"]["reservations"] = {
        "devices": [{"driver": "nvidia", "count": "one", "capabilities": "gpu"}]
    }
    broken["services"]["redis"]["healthcheck"]["interval"] = 10
    assert len(list(jsonschema.Draft202012Validator(schema).iter_errors(broken))) >= 2


def compose_cli() -> list[str] | None:
    """The Compose CLI here: the docker plugin (v2), else Debian's ``docker-compose`` (v1)."""
    if shutil.which("docker") and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_config_accepts_the_file(tmp_path):
    """Compose's own parser reads the file. Debian's Compose 1.29 (what ``.ci/run`` installs
    where the plugin is missing) predates the top-level ``name`` key: it reads the file without
    that key, given the same name with ``-p``; the schema test above checks ``name``."""
    from tests.ci import unavailable

    cli = compose_cli()
    if cli is None:
        unavailable("no Compose CLI (docker compose, docker-compose) is installed")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in filled_env().items()))
    compose_file, project = COMPOSE, []
    if cli == ["docker-compose"]:
        raw = COMPOSE.read_text()
        name = yaml.safe_load(raw)["name"]
        compose_file = tmp_path / "compose.yaml"
        compose_file.write_text(re.sub(r"(?m)^name:.*\n", "", raw, count=1))
        project = ["-p", name, "--project-directory", str(DOCKER)]
    cmd = [*cli, *project, "--env-file", str(env_file), "-f", str(compose_file), "config", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # The check can fail: a service with an unknown key is refused.
    broken = tmp_path / "broken.yaml"
    bad_service = "services:\n  redis-extra:\n    image: redis\n    colour: red\n"
    broken.write_text(compose_file.read_text().replace("services:\n", bad_service, 1))
    cmd[cmd.index(str(compose_file))] = str(broken)
    assert subprocess.run(cmd, capture_output=True, text=True).returncode != 0


# ---- secrets ----------------------------------------------------------------------------------
def test_every_secret_comes_from_the_env_file_without_a_default():
    example = read_env_file(DOCKER / ".env.example")
    raw = raw_compose()
    used = variables_in(raw)
    assert used <= set(example), f"not in docker/.env.example: {sorted(used - set(example))}"
    secrets = {k for k in example if SECRET.search(k)}
    assert secrets == {k for k in used if SECRET.search(k)}
    assert all(example[k] == "" for k in secrets), "docker/.env.example must hold no password"
    # Left empty, each secret stops the interpolation with its own name.
    for name in secrets:
        env = {k: v or "x" for k, v in example.items()}
        env[name] = ""
        with pytest.raises(MissingVariable, match=name):
            interpolate_tree(raw, env)
    # No service spells a secret out: every secret-looking setting is interpolated.
    for sname, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET.search(key):
                assert "${" in str(value), f"{sname}: {key} is not taken from docker/.env"
    assert (DOCKER / ".gitignore").read_text().splitlines().count(".env") == 1


# ---- the topology -----------------------------------------------------------------------------
def test_services_queues_gpu_reservation_and_healthchecks(compose):
    from sae_pipeline.config import load_config

    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        if name != "airflow-init":
            assert "healthcheck" in service, f"{name} has no healthcheck"
        if name.startswith("airflow-") and name != "airflow-init":
            assert services[name]["depends_on"]["airflow-init"] == {
                "condition": "service_completed_successfully"
            }
    for name, queue in WORKERS.items():
        (argv,) = invocations(services[name], "airflow")
        assert argv[:2] == ["celery", "worker"]
        assert argv[argv.index("--queues") + 1] == queue
    for name in ("airflow-worker-gpu-0", "airflow-worker-gpu-1"):
        gpu = services[name]
        assert gpu["build"]["target"] == "cuda"
        assert gpu["image"] != services["airflow-worker-cpu"]["image"]
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]

    # The config the DAGs run with sends heavy tasks to the gpu queue and keeps artifacts on
    # the volume every worker mounts.
    env = compose["x-airflow-env"]
    config_path = env["SAE_CONFIG"].replace(IMAGE_ROOT, str(REPO), 1)
    cfg = load_config(config_path)
    assert cfg.heavy_queue == "gpu"
    for name in WORKERS:
        mounts = dict(v.split(":")[:2][::-1] for v in services[name]["volumes"])
        assert mounts[cfg.artifacts_root] == "sae-artifacts", name
        assert "/data" in mounts and f"{IMAGE_ROOT}/dags" in mounts
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow_env = services["mlflow"]["environment"]
    mlflow_mounts = dict(v.split(":")[:2][::-1] for v in services["mlflow"]["volumes"])
    assert mlflow_mounts[mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"]] == "mlflow-artifacts"
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert mlflow_env["MLFLOW_AUTH"] == "basic"
    assert {"sae-artifacts", "sae-data", "mlflow-artifacts"} <= set(compose["volumes"])


def test_encoder_service_serves_the_champion_from_the_mlflow_server(compose):
    from sae_pipeline.cli import build_parser
    from sae_pipeline.config import load_config

    svc = compose["services"]["encoder-service"]
    (argv,) = invocations(svc, "sae-pipeline")
    args = build_parser().parse_args(argv)  # the installed CLI accepts the command
    assert args.command == "serve" and args.alias == "champion" and args.interval > 0
    assert args.host == "0.0.0.0"
    assert svc["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert svc["environment"]["MLFLOW_TRACKING_PASSWORD"]
    assert svc["environment"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert svc["depends_on"]["mlflow"] == {"condition": "service_healthy"}
    published = {p.split(":")[-1] for p in svc["ports"]}
    assert published == {str(args.port)}
    health = " ".join(svc["healthcheck"]["test"])
    assert f"localhost:{args.port}/ping" in health
    cfg = load_config(svc["environment"]["SAE_CONFIG"].replace(IMAGE_ROOT, str(REPO), 1))
    assert cfg.registry.encoder_model_name  # the model it serves comes from the shared config


def test_databases_in_connection_urls_are_created_by_the_postgres_init_script(compose):
    created = set(re.findall(r"CREATE DATABASE (\w+)", (DOCKER / "postgres-init.sh").read_text()))
    urls = re.findall(r"postgresql\+psycopg2://[^\"'\s]*@postgres:5432/(\w+)", json.dumps(compose))
    assert set(urls) == created == {"airflow", "mlflow", "mlflow_auth"}


def test_worker_preload_modules_exist(compose):
    for name in WORKERS:
        extra = json.loads(
            compose["services"][name]["environment"]["AIRFLOW__CELERY__EXTRA_CELERY_CONFIG"]
        )
        for module in extra["imports"]:
            assert find_spec(module) is not None, f"{name} preloads {module}, which does not exist"


# ---- everything it names exists -----------------------------------------------------------
def dockerfile_stages() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I))


def test_files_named_by_the_compose_file_exist(compose):
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+?)/?\s", DOCKERFILE.read_text(), re.M))
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == REPO, name
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
            assert service["build"]["target"] in dockerfile_stages()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
        for word in command_of(service):
            if word.startswith(f"{IMAGE_ROOT}/"):
                path = REPO / word.removeprefix(f"{IMAGE_ROOT}/")
                assert path.is_file() and path.stat().st_mode & stat.S_IXUSR, word
                assert path.relative_to(REPO).parts[0] in copied, f"the images lack {word}"
    assert (DOCKER / "postgres-init.sh").stat().st_mode & stat.S_IXUSR


def test_airflow_and_celery_commands_parse_with_the_installed_cli(compose, tmp_path):
    argvs = [
        argv for service in compose["services"].values() for argv in invocations(service, "airflow")
    ]
    assert len(argvs) >= 8  # init, api-server, scheduler, dag-processor, triggerer, 2 workers...
    celery_apps = {
        argv[argv.index("--app") + 1]
        for service in compose["services"].values()
        for argv in invocations(service, "celery")
    }
    script = """
import importlib, json, sys
from airflow.cli.cli_parser import get_parser
parser = get_parser()
for argv in json.loads(sys.argv[1]):
    assert callable(parser.parse_args(argv).func), argv
for path in json.loads(sys.argv[2]):
    module, _, attr = path.rpartition(".")
    getattr(importlib.import_module(module), attr).control
print("parsed", len(json.loads(sys.argv[1])))
"""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # The users/roles/fab-db commands are the FAB auth manager's.
        "AIRFLOW__CORE__AUTH_MANAGER": compose["x-airflow-env"]["AIRFLOW__CORE__AUTH_MANAGER"],
    }
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs), json.dumps(sorted(celery_apps))],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"parsed {len(argvs)}" in result.stdout


# ---- the images install with the README's script ------------------------------------------
def test_images_install_with_the_script_make_uses():
    text = DOCKERFILE.read_text()
    runs = re.findall(r"^RUN\s+(.+?)(?<!\\)$", text, re.M | re.S)
    installs = [r for r in runs if re.search(r"\bpip\b|\buv |install|conda|\bapt", r)]
    assert installs, "no install step found"
    for run in installs:
        assert re.fullmatch(r'TORCH_INDEX_URL="\$TORCH_INDEX_URL" \./install\.sh', run.strip()), run
    stages = re.split(r"^FROM ", text, flags=re.M)
    final = {s.split()[2]: s for s in stages[1:] if len(s.split()) > 2 and s.split()[1] == "AS"}
    assert {"cpu", "cuda"} <= set(final)
    assert "download.pytorch.org/whl/cpu" in final["cpu"]
    for stage in ("cpu", "cuda"):
        assert "./install.sh" in final[stage], stage
    # The same script is what `make` and the README use, and it honours the three settings.
    makefile = (REPO / "Makefile").read_text()
    assert "./install.sh" in makefile
    assert "install.sh" in (REPO / "README.md").read_text()
    script = (REPO / "install.sh").read_text()
    for setting in ("VENV", "EXTRAS", "TORCH_INDEX_URL"):
        assert "${" + setting in script, setting
    assert "EXTRAS=distributed" in text  # the images carry the Celery and PostgreSQL clients


# ---- mlflow/start-server.sh ----------------------------------------------------------------
@pytest.fixture
def fake_mlflow(tmp_path):
    """An ``mlflow`` that records its arguments and the auth config it was given."""
    out = tmp_path / "out"
    out.mkdir()
    fake = tmp_path / "mlflow"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$@" > {out}/args\n'
        f'if [ -n "${{MLFLOW_AUTH_CONFIG_PATH:-}}" ]; then cp "$MLFLOW_AUTH_CONFIG_PATH" {out}/auth.ini; fi\n'  # noqa: E501
        f"env > {out}/env\n"
    )
    fake.chmod(0o755)
    return fake, out


def run_start_script(fake: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ["PATH"],
        "MLFLOW": str(fake),
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:pw@db:5432/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": "/srv/mlflow-artifacts",
    }
    return subprocess.run(
        [str(REPO / "mlflow" / "start-server.sh")],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mlflow_start_script_runs_an_authenticated_server_mlflow_accepts(
    fake_mlflow, tmp_path, monkeypatch
):
    from mlflow.cli import server
    from mlflow.server.auth.config import read_auth_config

    fake, out = fake_mlflow
    result = run_start_script(
        fake,
        tmp_path,
        MLFLOW_AUTH_DATABASE_URI="postgresql+psycopg2://mlflow:p%40ss$1@db:5432/mlflow_auth",
        MLFLOW_FLASK_SERVER_SECRET_KEY="k",
        MLFLOW_AUTH_ADMIN_PASSWORD="p",
        MLFLOW_ALLOWED_HOSTS="mlflow:5000,localhost:*",
    )
    assert result.returncode == 0, result.stderr
    args = (out / "args").read_text().splitlines()
    assert args[0] == "server"
    params = server.make_context("server", args[1:]).params  # what `mlflow server` would parse
    assert params["backend_store_uri"] == "postgresql+psycopg2://mlflow:pw@db:5432/mlflow"
    assert params["artifacts_destination"] == "/srv/mlflow-artifacts"
    assert params["serve_artifacts"] is True
    assert params["app_name"] == "basic-auth"
    assert params["allowed_hosts"] == "mlflow:5000,localhost:*"
    assert (params["host"], params["port"], params["workers"]) == ("0.0.0.0", 5000, "2")
    env = read_env_file(out / "env")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(out / "auth.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", env["MLFLOW_AUTH_ADMIN_USERNAME"])
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    auth = read_auth_config()
    assert auth.database_uri == "postgresql+psycopg2://mlflow:p%40ss$1@db:5432/mlflow_auth"
    assert (auth.admin_username, auth.admin_password) == ("admin", "p")
    assert auth.default_permission == "READ"
    assert auth.auth_cache_ttl_seconds == 60
    # The rendered config (it holds the database password) is gone with the server.
    assert not list(tmp_path.glob("mlflow-auth.*.ini"))


def test_mlflow_start_script_names_a_missing_setting(fake_mlflow, tmp_path):
    fake, out = fake_mlflow
    result = run_start_script(fake, tmp_path, MLFLOW_AUTH_DATABASE_URI="sqlite:///x.db")
    assert result.returncode != 0
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in result.stderr
    assert not (out / "args").exists()
    result = run_start_script(fake, tmp_path, MLFLOW_AUTH="none")
    assert result.returncode == 0, result.stderr
    assert "--app-name" not in (out / "args").read_text().splitlines()


# ---- issue 15: GPUs, MLflow artifacts, auth, least privilege -------------------------------
def test_each_gpu_worker_is_pinned_to_its_own_device(compose):
    """`--scale` gives every replica the same GPU: one service per device instead."""
    devices = {}
    for name, service in compose["services"].items():
        for reservation in (
            service.get("deploy", {})
            .get("resources", {})
            .get("reservations", {})
            .get("devices", [])
        ):
            assert "count" not in reservation, f"{name}: a count reservation is not spread"
            devices[name] = reservation["device_ids"]
    assert devices == {"airflow-worker-gpu-0": ["0"], "airflow-worker-gpu-1": ["1"]}
    assert "--scale airflow-worker-gpu" not in COMPOSE.read_text()
    assert compose["services"]["airflow-worker-gpu-1"]["profiles"] == ["second-gpu"]


def test_mlflow_artifact_folder_is_in_the_image_and_owned_by_the_server_user(compose):
    text = DOCKERFILE.read_text()
    dest = compose["services"]["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"]
    (setup,) = [r for r in re.findall(r"^RUN\s+(.+?)(?<!\\)$", text, re.M | re.S) if "useradd" in r]
    assert re.search(rf"mkdir -p [^&]*{re.escape(dest)}(\s|$)", setup), setup
    assert re.search(rf"chown -R airflow:0 [^&]*{re.escape(dest)}(\s|$)", setup), setup
    assert "--uid 50000" in setup
    # Both images run as that user (the mlflow service uses the cpu image).
    for stage in re.split(r"^FROM ", text, flags=re.M)[2:]:
        assert stage.rstrip().splitlines()[-1] == "USER airflow", stage.split()[2]


def test_mlflow_healthcheck_fails_when_the_artifact_folder_is_not_writable(compose, tmp_path):
    import http.server
    import threading

    test = compose["services"]["mlflow"]["healthcheck"]["test"]
    assert test == ["CMD", "python", f"{IMAGE_ROOT}/mlflow/healthcheck.py"]
    script = REPO / "mlflow" / "healthcheck.py"

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:

        def check(folder: Path) -> subprocess.CompletedProcess:
            env = {
                **os.environ,
                "MLFLOW_HEALTH_URL": f"http://127.0.0.1:{server.server_port}/health",
                "MLFLOW_ARTIFACTS_DESTINATION": str(folder),
            }
            return subprocess.run(
                [sys.executable, str(script)], env=env, capture_output=True, text=True
            )

        writable = tmp_path / "ok"
        writable.mkdir()
        assert check(writable).returncode == 0
        assert list(writable.iterdir()) == []  # the probe is removed
        result = check(tmp_path / "missing")  # as in the image before: no such folder
        assert result.returncode == 1 and "not writable" in result.stderr
    finally:
        server.shutdown()


def test_airflow_uses_the_fab_auth_manager_with_viewer_reviewer_and_admin_roles(compose):
    env = compose["x-airflow-env"]
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == FAB
    assert not any("SIMPLE_AUTH_MANAGER" in k for k in env)
    assert find_spec("airflow.providers.fab") is not None
    init = invocations(compose["services"]["airflow-init"], "airflow")
    assert ["fab-db", "migrate"] in init
    (imported,) = [a for a in init if a[:2] == ["roles", "import"]]
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["airflow-init"]["volumes"])
    roles = json.loads((DOCKER / mounts[imported[2]]).read_text())
    reviewer = {(a, r["resource"]) for r in roles for a in r["action"].split(",")}
    assert {r["name"] for r in roles} == {"Reviewer"}
    # A reviewer answers review (HITL) steps and reads the rest; it cannot trigger or edit.
    assert ("can_edit", "HITL Detail") in reviewer
    assert ("can_read", "DAGs") in reviewer
    assert not {("can_create", "DAG Runs"), ("can_edit", "DAGs")} & reviewer
    (create,) = [a for a in init if a[:2] == ["users", "create"]]
    assert create[create.index("--role") + 1] == "Admin"


def test_only_the_workers_hold_mlflow_credentials_and_not_the_admins(compose):
    services = compose["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        if name in WORKERS:
            assert env["MLFLOW_TRACKING_USERNAME"] == "sae-worker"
            assert env["MLFLOW_TRACKING_PASSWORD"] == "test-mlflow_worker_password"
            assert env["SAE_ALLOWED_TRACKING_URIS"] == env["MLFLOW_TRACKING_URI"]
        elif name == "encoder-service":  # reads the registry as the workers' user
            assert env["MLFLOW_TRACKING_USERNAME"] == "sae-worker"
            assert env["MLFLOW_TRACKING_PASSWORD"] == "test-mlflow_worker_password"
        elif name != "mlflow":
            assert "MLFLOW_TRACKING_PASSWORD" not in env, name
        assert "test-mlflow_admin_password" not in json.dumps(env) or name == "mlflow", name
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_WORKER_USERNAME"] == "sae-worker"
    start = (REPO / "mlflow" / "start-server.sh").read_text()
    assert "create-worker-user.py" in start
    assert (REPO / "mlflow" / "create-worker-user.py").stat().st_mode & stat.S_IXUSR


# ---- issue 26: the CUDA image, its driver, the GPU workers the docs name ----------------------
def test_the_cuda_image_installs_an_explicit_cuda_build_and_the_docs_name_its_driver():
    stage = DOCKERFILE.read_text().split("FROM source AS cuda", 1)[1]
    (variant,) = re.findall(r"^ARG TORCH_CUDA=(cu\d{3})$", stage, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}" in stage
    assert "torch.version.cuda == want" in stage  # the build fails on another torch build
    cuda = f"{variant[2:-1]}.{variant[-1]}"  # cu128 -> 12.8
    docs = (REPO / "docs" / "deployment.md").read_text()
    assert f"TORCH_CUDA={variant}" in docs and f"CUDA {cuda} build of PyTorch" in docs
    assert re.search(r"NVIDIA driver of version \d{3} or later", docs)


def test_no_doc_names_a_worker_service_the_compose_file_lacks(compose):
    services = set(compose["services"])
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named = set(re.findall(r"airflow-worker-[a-z0-9]+(?:-[a-z0-9]+)*", doc.read_text()))
        assert named <= services, (doc.name, sorted(named - services))


# ---- issue 22: the trust boundary in the deployment ------------------------------------------
def test_the_image_code_is_not_writable_by_the_task_users_group():
    """COPY keeps the checkout's mode bits (group-writable under umask 002) and the task user
    has gid 0: each image ends by taking write access from group and others, after its last
    COPY and before it switches to that user."""
    stages = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)
    final = {s.split()[2]: s for s in stages[1:] if len(s.split()) > 2 and s.split()[1] == "AS"}
    for name in ("cpu", "cuda"):
        lines = [ln.strip() for ln in final[name].splitlines() if ln.strip()]
        chmod = [i for i, ln in enumerate(lines) if ln == f"RUN chmod -R go-w {IMAGE_ROOT}"]
        copies = [i for i, ln in enumerate(lines) if ln.startswith(("COPY", "ADD"))]
        user = next(i for i, ln in enumerate(lines) if ln.startswith("USER"))
        assert chmod and copies and max(copies) < chmod[-1] < user, name
        assert lines[user] == "USER airflow", name
    assert "USER" not in final["source"]  # the COPYs of the shared stage run as root too


def test_the_workers_have_every_allow_list_and_one_lock_folder(compose, monkeypatch):
    from sae_pipeline import boundary, storage
    from sae_pipeline.config import load_config
    from sae_pipeline.errors import ConfigError
    from sae_pipeline.steps._drift_decisions import retraining_data_uri

    lists = ("SAE_ALLOWED_TRACKING_URIS", "SAE_ALLOWED_ARTIFACT_ROOTS",
             "SAE_ALLOWED_CONFIG_DIRS", "SAE_ALLOWED_DATA_SOURCES")  # fmt: skip
    for name in WORKERS:
        env = compose["services"][name]["environment"]
        assert all(env.get(k) for k in lists), name
        mounts = dict(v.split(":")[:2][::-1] for v in compose["services"][name]["volumes"])
        root = env["SAE_ALLOWED_ARTIFACT_ROOTS"]
        assert mounts[root] == "sae-artifacts"  # every worker shares the root...
        assert env["SAE_LOCK_DIR"].startswith(root + "/")  # ...and the one promotion lock
    env = compose["services"]["airflow-worker-cpu"]["environment"]
    cfg = load_config(env["SAE_CONFIG"].replace(IMAGE_ROOT, str(REPO), 1))
    for k in lists:
        monkeypatch.setenv(k, env[k])
    # the shipped config's source, the monitor's retraining data and the champion's stored
    # config (what a retraining run's conf names) pass
    boundary.data_location(cfg.data.source)
    boundary.data_location(retraining_data_uri(root, "scheduled__2026"))
    boundary.config_location(storage.join(storage.run_dir(root, "manual__1"), "config.json"))
    with pytest.raises(ConfigError, match="outside the allowed"):
        boundary.data_location("http://169.254.169.254/latest/meta-data")


@pytest.fixture
def fake_mlflow_auth():
    """MLflow's basic-auth user API, in memory: an admin and an existing sae-worker user."""
    import base64
    import http.server
    import threading

    users = {"admin": "admin-pw", "sae-worker": "old-pw"}
    calls: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _who(self):
            auth = self.headers.get("Authorization", "").removeprefix("Basic ")
            user, _, pw = base64.b64decode(auth).decode().partition(":") if auth else ("", "", "")
            return user if users.get(user) == pw else None

        def _answer(self, status, body=None):
            data = json.dumps(body or {}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self):
            path = self.path.partition("?")[0]
            calls.append((self.command, path))
            size = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(size) or b"{}")
            if path == "/health":
                return self._answer(200)
            who = self._who()
            if who is None:
                return self._answer(401)
            if path.endswith("/users/create"):
                return self._answer(400 if body["username"] in users else 200)
            if path.endswith("/users/update-password") and who == "admin":
                users[body["username"]] = body["password"]
                return self._answer(200)
            if path.endswith("/users/get"):
                return self._answer(200)
            return self._answer(404)

        do_GET = do_POST = do_PATCH = _handle

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port, users, calls
    server.shutdown()


def test_a_rotated_worker_password_is_applied_to_mlflow(fake_mlflow_auth):
    port, users, calls = fake_mlflow_auth
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw",
           "MLFLOW_WORKER_USERNAME": "sae-worker", "MLFLOW_WORKER_PASSWORD": "new-pw"}  # fmt: skip
    script = [sys.executable, str(REPO / "mlflow" / "create-worker-user.py")]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert users["sae-worker"] == "new-pw"  # the workers' new password now logs them in
    assert "new-pw" not in done.stdout + done.stderr
    calls.clear()  # unchanged: nothing to update
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not any(path.endswith("/update-password") for _, path in calls)


def test_every_worker_runs_the_monitor_under_the_shipped_drift_policy(compose, monkeypatch):
    """Without ``$SAE_DRIFT_POLICY`` a trigger's params set the review and the judging fields
    (``drift_share: 1.0``: nothing ever drifts); the workers name the shipped policy."""
    from sae_pipeline.errors import ConfigError
    from sae_pipeline.monitoring.drift import load_policy
    from sae_pipeline.steps import monitoring

    paths = {compose["services"][n]["environment"].get("SAE_DRIFT_POLICY") for n in WORKERS}
    (path,) = paths
    assert path and path.startswith(IMAGE_ROOT + "/configs/")
    local = path.replace(IMAGE_ROOT, str(REPO), 1)
    load_policy(local)  # valid
    monkeypatch.setenv("SAE_DRIFT_POLICY", local)
    with pytest.raises(ConfigError, match="drift_share"):
        monitoring.prepare({}, None, {"drift_share": 1.0})
