"""Deployment files: Kubernetes overlays render and keep their invariants, Compose validates, YAML lints,
and every command line in them parses with the real CLI (a renamed flag breaks this test, not a fleet)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway import cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["cpu-demo", "sglang-gpu"]


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pods(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if "template" in d.get("spec", {})
    ]


def parses(argv: list[str]) -> argparse.Namespace:
    """``argv`` (starting at the subcommand) as the real ``prefixgate`` parser reads it."""
    return cli.build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_with_resources_and_probes(overlay: str) -> None:
    for name, spec in pods(render(overlay)):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"], name
            assert container["readinessProbe"] and container["livenessProbe"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_replicas_are_probed_on_health_and_protected(overlay: str) -> None:
    docs = render(overlay)
    gateway = find(docs, "Deployment", "gateway")
    assert gateway["spec"]["replicas"] >= 2
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert find(docs, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] >= 1
    hpa = find(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway" and hpa["spec"]["minReplicas"] >= 2
    args = parses(container["args"][1:])
    assert args.port == container["ports"][0]["containerPort"] and args.redis_url.startswith("redis://")
    engines = find(docs, "StatefulSet", "engine")
    assert engines["spec"]["serviceName"] == find(docs, "Service", "engine")["metadata"]["name"]
    assert find(docs, "Service", "engine")["spec"]["clusterIP"] == "None"  # headless
    http_port = engines["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    # every ready engine pod, found through the headless service's DNS name (scaling needs no edit here)
    assert args.worker_dns == [f"engine:{http_port}"] and not args.workers


def test_the_embedded_engine_listens_where_its_ports_say() -> None:
    engine = find(render("cpu-demo"), "StatefulSet", "engine")["spec"]["template"]["spec"]["containers"][0]
    args = parses(engine["args"][1:])
    ports = {p["name"]: p["containerPort"] for p in engine["ports"]}
    assert args.port == ports["http"]
    assert args.kv_events_endpoint.rsplit(":", 1)[1] == str(ports["kv-events"])


def test_sglang_workers_get_a_gpu_kv_events_and_16_token_pages() -> None:
    engine = find(render("sglang-gpu"), "StatefulSet", "engine")["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = engine["args"]
    assert "--page-size=16" in args and "--enable-hierarchical-cache" in args
    events = next(a for a in args if a.startswith("--kv-events-config="))
    assert '"publisher": "zmq"' in events and ":5557" in events


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_gateways_reach_the_workers_kv_events_and_redis(overlay: str) -> None:
    docs = render(overlay)
    policy = find(docs, "NetworkPolicy", "engine-from-gateway-only")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "engine"}
    rules = policy["spec"]["ingress"]
    kv_event_sources = [r["from"] for r in rules if any(p["port"] == 5557 for p in r["ports"])]
    assert kv_event_sources == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]]
    redis = find(docs, "NetworkPolicy", "redis-from-gateway-only")["spec"]["ingress"]
    assert redis[0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]
    monitor = find(docs, "ServiceMonitor", "prefixgate")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_compose_validates_and_its_commands_parse() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose (Debian's) is installed by scripts/setup.sh"
    subprocess.run([compose, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], check=True)
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for name in ("engine-1", "engine-2", "gateway-1", "gateway-2"):
        parses(services[name]["command"][1:])
    for port in (p for s in services.values() for p in s.get("ports", [])):
        assert port.startswith("127.0.0.1:"), f"published beyond loopback: {port}"


def test_yaml_lints_clean() -> None:
    subprocess.run(["yamllint", "-c", str(ROOT / ".yamllint.yaml"), str(DEPLOY)], check=True)
