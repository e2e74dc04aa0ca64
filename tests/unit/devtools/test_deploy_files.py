"""The deployment files under deploy/ parse and say what the design asks of them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def _yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("**/*.yaml")), ids=str)
def test_yaml_parses(path: Path) -> None:
    assert _yaml_documents(path)


def _kubernetes(kind: str, name: str) -> dict[str, Any]:
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in _yaml_documents(path):
            if document.get("kind") == kind and document["metadata"]["name"] == name:
                return dict(document)
    raise AssertionError(f"no {kind} {name}")


@pytest.mark.parametrize(("name", "replicas"), [("state-store", 3), ("policy", 2)])
def test_kubernetes_deployments(name: str, replicas: int) -> None:
    deployment = _kubernetes("Deployment", name)
    assert deployment["spec"]["replicas"] == replicas
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_the_api_runs_stateless_replicas_with_its_own_probes_and_tokens_read_only() -> None:
    deployment = _kubernetes("Deployment", "api")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/health/ready")):
        assert container[probe]["httpGet"]["path"] == path
    env = {item["name"]: item for item in container["env"]}
    assert env["KEEPER_API_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "api-redis-url"
    (tokens,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName")]
    assert tokens["secret"]["defaultMode"] == 0o400
    mount = next(m for m in container["volumeMounts"] if m["name"] == tokens["name"])
    assert mount["readOnly"] is True
    assert env["KEEPER_API_TOKENS_FILE"]["value"].startswith(mount["mountPath"])
    assert _kubernetes("Service", "api")["spec"]["selector"] == {"app.kubernetes.io/name": "api"}
    (compose,) = _yaml_documents(DEPLOY / "compose" / "compose.yaml")
    assert compose["services"]["api"]["deploy"]["replicas"] >= 2


@pytest.mark.parametrize(
    ("secret", "variable"),
    [
        ("keeper-kek", "KEEPER_STORE_KEK_FILE"),
        ("keeper-store-sealing-key", "KEEPER_STORE_SEALING_KEY_FILE"),
    ],
    ids=["kek", "sealing key"],
)
def test_the_store_keys_are_mounted_read_only_for_the_owner(secret: str, variable: str) -> None:
    pod = _kubernetes("Deployment", "state-store")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
    assert volume["secret"]["defaultMode"] == 0o400
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    env = {item["name"]: item for item in container["env"]}
    assert env[variable]["value"].startswith(mount["mountPath"])


def test_compose_runs_replicas_against_clusters() -> None:
    (compose,) = _yaml_documents(DEPLOY / "compose" / "compose.yaml")
    services = compose["services"]
    assert len([s for s in services if s.startswith("state-store-")]) == 3
    assert services["policy"]["deploy"]["replicas"] == 2
    assert len([s for s in services if s.startswith("rabbitmq-")]) == 3
    assert len([s for s in services if s.startswith("sentinel-")]) == 3
    replica_ids = {
        services[f"state-store-{i}"]["environment"]["KEEPER_STORE_REPLICA_ID"] for i in (1, 2, 3)
    }
    assert len(replica_ids) == 3


def _redis_directives(name: str) -> dict[str, str]:
    return {
        line.split(None, 1)[0]: line.split(None, 1)[1].strip()
        for line in (DEPLOY / "redis" / name).read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }


def test_redis_conf_keeps_every_write_and_listens_on_loopback() -> None:
    # Started for real from these files: tests/integration/devtools/test_redis_deploy_files.py.
    lines = _redis_directives("redis.conf")
    assert lines["appendonly"] == "yes"
    assert lines["appendfsync"] == "always"
    assert lines["maxmemory-policy"] == "noeviction"
    assert lines["bind"].split() == ["127.0.0.1", "-::1"]
    # A single Redis has no replica to wait for; replicated.conf adds the rule.
    assert "min-replicas-to-write" not in lines


def test_redis_conf_takes_tls_only_and_named_users_only() -> None:
    lines = _redis_directives("redis.conf")
    assert lines["port"] == "0"
    assert lines["tls-port"] == "6379"
    assert lines["tls-replication"] == "yes"
    assert lines["aclfile"] == "/etc/redis/users.acl"


def _includes(name: str) -> list[str]:
    text = (DEPLOY / "redis" / name).read_text(encoding="utf-8")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("include ")]


def test_replicated_conf_is_redis_conf_plus_a_replica_per_write() -> None:
    lines = _redis_directives("replicated.conf")
    assert _includes("replicated.conf") == ["/etc/redis/redis.conf", "/etc/redis/masterauth.conf"]
    assert lines["min-replicas-to-write"] == "1"
    # Replicas log in as the replication user; its password is never in this file.
    assert lines["masteruser"] == "keeper-replication"
    assert "masterauth" not in lines


def test_cluster_conf_is_replicated_conf_plus_the_cluster_over_tls() -> None:
    lines = _redis_directives("cluster.conf")
    assert _includes("cluster.conf") == ["/etc/redis/replicated.conf"]
    assert lines["cluster-enabled"] == "yes"
    assert lines["tls-cluster"] == "yes"
    assert lines["cluster-require-full-coverage"] == "yes"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_settings(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit, encoding="utf-8")
    service = parser["Service"]
    assert service["EnvironmentFile"].startswith("/etc/vtpm-keeper/")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"


# What `systemd-analyze verify` says about this machine rather than about the units.
_ENVIRONMENTAL = ("is not executable", "Unit libvirtd.service not found", "Failed to create")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not any(marker in line for marker in _ENVIRONMENTAL)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("script", sorted((DEPLOY / "dev").glob("*")), ids=lambda p: p.name)
def test_dev_scripts_parse(script: Path) -> None:
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
