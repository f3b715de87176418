"""Kubernetes pods from what a node has on disk: cgroup paths and the kubelet's log directories.

No API server is asked. The cgroup path of a container gives the pod uid, QoS class,
runtime and container id, in the layouts of both cgroup drivers:

    systemd   kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
              cri-containerd-<id>.scope  |  crio-<id>.scope  (crio-conmon-<id>.scope: CRI-O's monitor)
    cgroupfs  kubepods/burstable/pod<uid>/<id>  |  kubepods/burstable/pod<uid>/crio-<id>
    (Guaranteed pods sit right under kubepods: kubepods-pod<uid>.slice, kubepods/pod<uid>; kind and
    other nested set-ups prefix the slices: kubelet.slice/kubelet-kubepods-besteffort-pod<uid>.slice.)

Names come from the directories the kubelet keeps for container logs on every node:

    /var/log/pods/<namespace>_<pod>_<uid>/<container>/0.log
    /var/log/containers/<pod>_<namespace>_<container>-<container id>.log   (links into the above)

Pod labels and annotations are not on disk (the kubelet keeps them in memory; containerd does
not write them into the container's state): selecting pods by label needs the API server
(kubeapi.py), whose names, where it is asked, come first (PodDirectory.learn).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LOG_DIR = "/var/log"
LOG_DIR_ENV = "AGENTPROBE_KUBELET_LOG_DIR"  # where pods/ and containers/ are, for unusual set-ups
RESCAN_S = 2.0  # at most this often the log directories are read again for an unknown container
CACHE_PATHS = 4096  # cgroup paths whose pod and names are fully known, kept

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_SYSTEMD_POD = re.compile(rf"/(?:[a-z]+-)?kubepods(?:-(besteffort|burstable))?-pod({_UID})\.slice(?:/|$)")
_CGROUPFS_POD = re.compile(rf"/kubepods(?:/(besteffort|burstable))?/pod({_UID})(?:/|$)")
_CONTAINER = [
    ("cri-containerd", re.compile(r"^cri-containerd-([0-9a-f]{64})\.scope$")),
    ("crio", re.compile(r"^crio-([0-9a-f]{64})(?:\.scope)?$")),
    ("crio-conmon", re.compile(r"^crio-conmon-([0-9a-f]{64})\.scope$")),
    ("docker", re.compile(r"^docker-([0-9a-f]{64})\.scope$")),
    ("containerd", re.compile(r"^([0-9a-f]{64})$")),  # cgroupfs driver: the bare id
]
_CONTAINER_LOG = re.compile(r"^(?P<pod>[^_]+)_(?P<ns>[^_]+)_(?P<container>.+)-(?P<id>[0-9a-f]{64})\.log$")
_POD_DIR = re.compile(rf"^(?P<ns>[^_]+)_(?P<pod>[^_]+)_(?P<uid>{_UID})$")


@dataclass(frozen=True)
class PodCgroup:
    pod_uid: str  # with dashes, as the API shows it
    qos: str  # guaranteed, burstable, besteffort
    runtime: str | None = None  # cri-containerd, crio, containerd, docker; None: the pod's own cgroup
    container_id: str | None = None


def pod_cgroup(path: str) -> PodCgroup | None:
    """The pod (and container, if the path goes that deep) of a cgroup path; None outside kubepods."""
    m = _SYSTEMD_POD.search(path) or _CGROUPFS_POD.search(path)
    if m is None:
        return None
    uid = m.group(2).replace("_", "-")
    qos = m.group(1) or "guaranteed"
    rest = path[m.end():].strip("/")
    if not rest:
        return PodCgroup(uid, qos)
    first = rest.split("/", 1)[0]
    for runtime, pattern in _CONTAINER:
        c = pattern.match(first)
        if c:
            return PodCgroup(uid, qos, runtime, c.group(1))
    return PodCgroup(uid, qos)


class PodDirectory:
    """Namespace, pod and container names by pod uid and container id, from the kubelet's log
    directories; re-read (at most every RESCAN_S) when an unknown pod or container shows up."""

    def __init__(self, log_dir: str | os.PathLike | None = None) -> None:
        self.log_dir = Path(log_dir or os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR)
        self.pods: dict[str, tuple[str, str]] = {}  # uid -> (namespace, pod)
        self.containers: dict[str, tuple[str, str, str]] = {}  # id -> (namespace, pod, container)
        self._scanned = -RESCAN_S
        self._known: dict[str, dict] = {}  # cgroup path -> container map, once its names are all known
        self.api_pods: dict[str, tuple[str, str]] = {}  # the same, from the API server (kubeapi.py)
        self.api_containers: dict[str, tuple[str, str, str]] = {}

    @property
    def available(self) -> bool:
        return (self.log_dir / "pods").is_dir()

    def scan(self) -> None:
        self._scanned = time.monotonic()
        pods: dict[str, tuple[str, str]] = {}
        containers: dict[str, tuple[str, str, str]] = {}
        try:
            for entry in os.scandir(self.log_dir / "pods"):
                m = _POD_DIR.match(entry.name)
                if m:
                    pods[m.group("uid").replace("_", "-")] = (m.group("ns"), m.group("pod"))
        except OSError:
            pass
        try:
            for entry in os.scandir(self.log_dir / "containers"):
                m = _CONTAINER_LOG.match(entry.name)
                if m:
                    containers[m.group("id")] = (m.group("ns"), m.group("pod"), m.group("container"))
        except OSError:
            pass
        self.pods, self.containers = pods, containers

    def learn(self, pods: dict[str, tuple[str, str]], containers: dict[str, tuple[str, str, str]]) -> None:
        """Names from the API server's pod list (they win over the log directories'): all of them,
        replacing what it said before."""
        self.api_pods, self.api_containers = dict(pods), dict(containers)
        self._known.clear()

    def names(self, pc: PodCgroup) -> dict:
        """{'namespace', 'pod', 'container'} as far as known (empty when nothing is)."""
        pod = self.api_pods.get(pc.pod_uid) or self.pods.get(pc.pod_uid)
        container = pc.container_id and (self.api_containers.get(pc.container_id)
                                         or self.containers.get(pc.container_id))
        if (pod is None or (pc.container_id and container is None)) and time.monotonic() - self._scanned >= RESCAN_S:
            self.scan()
            pod = self.api_pods.get(pc.pod_uid) or self.pods.get(pc.pod_uid)
            container = pc.container_id and (self.api_containers.get(pc.container_id)
                                             or self.containers.get(pc.container_id))
        out: dict = {}
        if pod:
            out["namespace"], out["pod"] = pod
        if container:
            ns, pod_name, name = container
            out.update(namespace=ns, pod=pod_name, name=name)
        return out

    def container_info(self, path: str) -> dict | None:
        """The `container` map of a record for a cgroup path inside kubepods, names included."""
        if path in self._known:
            return dict(self._known[path])
        pc = pod_cgroup(path)
        if pc is None:
            return None
        out: dict = {"pod_uid": pc.pod_uid, "qos": pc.qos}
        if pc.container_id:
            out["runtime"] = pc.runtime
            out["id"] = pc.container_id
        out.update(self.names(pc))
        if "pod" in out and (pc.container_id is None or "name" in out):
            if len(self._known) >= CACHE_PATHS:
                self._known.clear()
            self._known[path] = dict(out)
        return out
