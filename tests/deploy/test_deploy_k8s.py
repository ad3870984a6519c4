"""deploy/k8s checked without a cluster: `kubectl kustomize` renders base and the cuda overlay and
`kubernetes-validate` checks every object against the Kubernetes API's JSON schemas (strict: an unknown field
fails) for the oldest and newest versions we support; then what no schema can say (non-root, probes on the
port the process serves, the key mounted where --swarm-key reads it, GPUs in the overlay, stable dht names).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.cli_flags import REPO, flag_value, need

K8S = REPO / "deploy" / "k8s"
K8S_VERSIONS = ("1.27.0", "latest")  # 1.27: the first with GA gRPC probes


def test_k8s_files_match_the_api_schemas_as_written() -> None:
    """Each object as written (before kustomize), so the schemas are checked even where kubectl is missing."""
    kubernetes_validate = need("kubernetes_validate", "kubernetes-validate")

    count = 0
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
            count += 1
    assert count >= 8


def render(kustomization: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` on a copy of deploy/k8s that holds a throw-away swarm key (the real one is git-ignored)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations (apt-get install kubectl)")
    copy = tmp_path / "k8s"
    if not copy.exists():
        shutil.copytree(K8S, copy)
        (copy / "base" / "swarm_key").write_text("0" * 64 + "\n")
    out = subprocess.run(
        [kubectl, "kustomize", str(copy / kustomization.relative_to(K8S))], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("k8s")
    return {name: render(K8S / name, tmp) for name in ("base", "overlays/cuda")}


def by_kind(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container_argv(container: dict[str, Any]) -> list[str]:
    return [str(t) for t in container.get("command", []) + container.get("args", [])]


@pytest.mark.parametrize("name", ["base", "overlays/cuda"])
def test_k8s_objects_match_the_api_schemas(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    kubernetes_validate = need("kubernetes_validate", "kubernetes-validate")

    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in rendered[name])
    for version in K8S_VERSIONS:
        v = kubernetes_validate.latest_version() if version == "latest" else version
        for obj in rendered[name]:
            kubernetes_validate.validate(obj, v, strict=True)  # raises with the failing path
    print(f"{name}: {len(kinds)} objects valid for Kubernetes {', '.join(K8S_VERSIONS)}: {kinds}")


def test_k8s_pods_are_locked_down_and_sized(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objs in rendered.items():
        for obj in objs:
            if obj["kind"] not in ("Deployment", "StatefulSet"):
                continue
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] == 10001, where  # the image's user
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod["automountServiceAccountToken"] is False, where
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
                assert "memory" in c["resources"]["limits"], where
                assert c["image"] in ("pollen:cpu", "pollen:cuda"), where
                assert "readinessProbe" in c and "livenessProbe" in c, where
                # the key: a Secret volume, mounted where --swarm-key reads it
                argv = " ".join(container_argv(c))
                key = re.search(r"--swarm-key (\S+)", argv)
                assert key, f"{where}: no --swarm-key"
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                secret_mounts = [n for n in mounts if "secret" in volumes.get(n, {})]
                assert [str(Path(key.group(1)).parent)] == [mounts[n] for n in secret_mounts], where
                assert volumes[secret_mounts[0]]["secret"]["secretName"].startswith("pollen-swarm-key-"), where


def test_k8s_dht_nodes_have_stable_addresses(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["base"]
    sts = by_kind(objs, "StatefulSet", "dht")
    svc = by_kind(objs, "Service", "dht")
    pdb = by_kind(objs, "PodDisruptionBudget", "dht")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "dht"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= labels.items() and pdb["spec"]["selector"]["matchLabels"] == labels
    assert {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == {(31337, "UDP"), (31337, "TCP")}
    c = sts["spec"]["template"]["spec"]["containers"][0]
    script = c["args"][0]
    assert '--announce-host "$POD_NAME.dht.$POD_NAMESPACE.svc"' in script and "--port 31337" in script
    assert c["readinessProbe"]["grpc"]["port"] == 31337 == c["livenessProbe"]["grpc"]["port"]
    replicas = {e["name"]: e.get("value") for e in c["env"]}["DHT_REPLICAS"]
    assert int(replicas) == sts["spec"]["replicas"] >= 2
    # the peer list the script builds for dht-1 (run by a real shell): every other pod, never itself
    env = {"DHT_REPLICAS": replicas, "POD_NAME": "dht-1", "POD_NAMESPACE": "pollen"}
    probe = script.split("exec dht-node")[0] + 'printf %s "$peers"'
    peers = subprocess.run(["sh", "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert peers == "dht-0.dht.pollen.svc:31337,dht-2.dht.pollen.svc:31337"
    # every other role lists all of them
    for name in ("shard", "gateway"):
        argv = container_argv(by_kind(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0])
        expected = [f"dht-{i}.dht:31337" for i in range(int(replicas))]
        assert flag_value(argv, "--initial-peers").split(",") == expected, name


def test_k8s_shard_servers_probe_health_and_get_gpus(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objs in rendered.items():
        c = by_kind(objs, "Deployment", "shard")["spec"]["template"]["spec"]["containers"][0]
        argv = container_argv(c)
        port = int(flag_value(argv, "--port"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (name, probe)  # the kubelet's own gRPC health probe
        assert flag_value(argv, "--public-address") == f"$(POD_IP):{port}"
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if name == "overlays/cuda":
            assert gpus == 1 and c["image"] == "pollen:cuda" and flag_value(argv, "--device") == "cuda"
        else:
            assert gpus is None and c["image"] == "pollen:cpu" and "--device" not in argv


def test_k8s_gateway_is_behind_a_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["base"]
    svc = by_kind(objs, "Service", "gateway")
    pod = by_kind(objs, "Deployment", "gateway")["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    c = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[svc["spec"]["ports"][0]["targetPort"]] == int(flag_value(container_argv(c), "--port"))
    assert c["readinessProbe"]["httpGet"]["port"] == "http"
