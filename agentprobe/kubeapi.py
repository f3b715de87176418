"""Agent pods chosen by label or annotation, from the Kubernetes API server, mapped to their cgroups.

On each node the watcher lists the pods the API server has scheduled there,

    GET /api/v1/pods?fieldSelector=spec.nodeName=<node>

with the pod's service-account token and CA (in-cluster: /var/run/secrets/kubernetes.io/serviceaccount,
KUBERNETES_SERVICE_HOST/PORT), again every `refresh_s`. A pod is selected when its labels match one
of the label selectors (`key=value`, `key!=value`, `key`, `!key`, comma-separated = all of them) or
one of its annotations matches (`agentprobe.io/watch=true` by default). Each selected pod's uid
is looked up among the node's cgroups (kube.pod_cgroup: containerd and CRI-O, systemd and
cgroupfs drivers) and the pod's own cgroup is watched with its subtree: every container of the
pod, also those started later. The API's namespace, pod and container names go to the enricher.

A failure at start (API unreachable, refused, not a pod list) is a KubeError: one line, exit 1.
Later lists come from a background thread, so a slow API server never stalls the watcher; a
failure while running keeps the last good selection and is returned as a `kube` record.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import threading
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import WatchedCgroup, cgroup_id
from .errors import AgentprobeError
from .kube import PodDirectory, pod_cgroup

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_ANNOTATION = "agentprobe.io/watch=true"
MAX_BODY = 64 << 20  # a pod list larger than this is refused, not read into memory
TIMEOUT_S = 5.0
MKDIR_REFRESH_S = 0.5  # the lister asks at most this often (a new pod cgroup of an unknown uid asks at once)

_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]{0,252}/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
_REQ = re.compile(rf"^\s*(?P<neg>!)?\s*(?P<key>{_KEY})\s*(?:(?P<op>==|!=|=)\s*(?P<value>{_VALUE}))?\s*$")


class KubeError(AgentprobeError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """A label selector as kubectl's -l takes it (equality and existence): all must match."""
    reqs = []
    for part in text.split(","):
        m = _REQ.match(part)
        if m is None or (m.group("neg") and m.group("op")):
            raise KubeError(f"{text!r} is not a label selector (key=value, key!=value, key or !key, "
                            "comma-separated)")
        op = m.group("op")
        if op is None:
            reqs.append(Requirement(m.group("key"), "!exists" if m.group("neg") else "exists"))
        else:
            reqs.append(Requirement(m.group("key"), "!=" if op == "!=" else "=", m.group("value") or ""))
    return tuple(reqs)


def parse_annotation(text: str) -> tuple[str, str | None]:
    """KEY=VALUE (that value) or KEY (any value)."""
    key, eq, value = text.partition("=")
    if not re.fullmatch(_KEY, key.strip()):
        raise KubeError(f"{text!r} is not an annotation (KEY=VALUE or KEY)")
    return key.strip(), value if eq else None


@dataclass(frozen=True)
class Pod:
    uid: str
    namespace: str
    name: str
    labels: dict = field(default_factory=dict, hash=False)
    annotations: dict = field(default_factory=dict, hash=False)
    containers: dict = field(default_factory=dict, hash=False)  # container id -> name
    phase: str = ""


def parse_pod_list(body: bytes) -> list[Pod]:
    """The pods of a PodList (v1). Raises ValueError when it is not one."""
    doc = json.loads(body)
    if not isinstance(doc, dict) or doc.get("kind") != "PodList" or not isinstance(doc.get("items"), list):
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"not a PodList (kind {kind!r})")
    pods = []
    for item in doc["items"]:
        meta = item.get("metadata") or {}
        status = item.get("status") or {}
        uid = meta.get("uid")
        if not isinstance(uid, str) or not isinstance(meta.get("name"), str):
            raise ValueError("a pod without metadata.uid or metadata.name")
        containers = {}
        for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or []:
                cid = (cs.get("containerID") or "").rpartition("://")[2]
                if cid and cs.get("name"):
                    containers[cid] = cs["name"]
        pods.append(Pod(uid, meta.get("namespace") or "default", meta["name"], dict(meta.get("labels") or {}),
                        dict(meta.get("annotations") or {}), containers, status.get("phase") or ""))
    return pods


def default_api_url() -> str | None:
    """The in-cluster address of the API server (what client-go uses), or None outside a pod."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def default_node_name() -> str:
    """NODE_NAME (the DaemonSet sets it from spec.nodeName), else the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


class KubeApi:
    """GET of the node's pods, with the service account's token (re-read each time: bound tokens
    rotate) and CA."""

    def __init__(self, url: str, sa_dir: str | os.PathLike = SA_DIR, timeout: float = TIMEOUT_S) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise KubeError(f"{url!r} is not a Kubernetes API address (https://HOST:PORT)")
        self.url = url.rstrip("/")
        self.scheme, self.host = u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base = u.path.rstrip("/")
        self.sa_dir = Path(sa_dir)
        self.timeout = timeout

    def _context(self) -> ssl.SSLContext:
        ca = self.sa_dir / "ca.crt"
        try:
            return ssl.create_default_context(cafile=str(ca) if ca.is_file() else None)
        except (OSError, ssl.SSLError) as e:
            raise KubeError(f"cannot use the Kubernetes CA {ca}: {e}") from None

    def _token(self) -> str | None:
        try:
            return (self.sa_dir / "token").read_text().strip() or None
        except OSError:
            return None

    def list_pods(self, node: str) -> list[Pod]:
        path = f"{self.base}/api/v1/pods?" + urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={node}"})
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Accept": "application/json", "User-Agent": "agentprobe"}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_BODY + 1)
        except ssl.SSLError as e:
            raise KubeError(f"cannot reach the Kubernetes API {self.url}: TLS: {e.reason or e}") from None
        except (OSError, http.client.HTTPException) as e:
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise KubeError(f"cannot reach the Kubernetes API {self.url}: {why}") from None
        finally:
            conn.close()
        if resp.status != 200:
            try:
                message = json.loads(body).get("message") or ""
            except (ValueError, AttributeError):
                message = ""
            hint = (" (the service account needs get and list on pods: see packaging/kubernetes/daemonset.yaml)"
                    if resp.status in (401, 403) else "")
            detail = f": {' '.join(message.split())[:300]}" if message else ""
            raise KubeError(f"the Kubernetes API {self.url} refused to list the pods of node {node}: "
                            f"{resp.status} {resp.reason}{detail}{hint}")
        if len(body) > MAX_BODY:
            raise KubeError(f"the Kubernetes API {self.url}: pod list larger than {MAX_BODY >> 20} MiB")
        try:
            return parse_pod_list(body)
        except (ValueError, TypeError, AttributeError) as e:
            raise KubeError(f"the Kubernetes API {self.url} sent no usable pod list: {e}") from None


class PodSelection:
    """The agent pods of this node and their cgroups, kept up to date.

    The first list is taken at start, in the caller's thread (a failure stops the watcher). Later
    lists are taken by a background thread (an API server that is slow or away never stalls the
    watcher's loop) and applied in the loop's thread by `refresh()` and `new_pod_cgroup()`."""

    def __init__(self, api: KubeApi, node: str, selectors: list[str] = (), annotations: list[str] = (),
                 refresh_s: float = 10.0) -> None:
        self.api = api
        self.node = node
        self.selectors = [parse_selector(s) for s in selectors]
        self.annotations = [parse_annotation(a) for a in annotations]
        self.refresh_s = refresh_s
        self.pods: dict[str, Pod] = {}  # uid -> pod, every pod of the node
        self.selected: dict[str, Pod] = {}
        self.failures = 0  # lists that failed while running
        self._failing = False
        self._results: deque = deque()  # (pods or None, error or None) from the lister thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[dict] = []  # records of lists applied in new_pod_cgroup, for the next refresh()
        self._paths: dict[str, Path] = {}  # uid -> the pod's cgroup directory
        self._mapped: set[str] = set()  # selected uids whose cgroup was found
        self.directory: PodDirectory | None = None  # names go there (the enricher's)

    def name_into(self, directory: PodDirectory) -> None:
        """Pod, namespace and container names go to `directory` (the enricher's), now and after
        every pod list."""
        self.directory = directory
        self._names()

    def describe(self) -> dict:
        return {"api": self.api.url, "node": self.node,
                "selectors": [",".join(_req_text(r) for r in s) for s in self.selectors],
                "annotations": [k if v is None else f"{k}={v}" for k, v in self.annotations]}

    def wants(self, pod: Pod) -> bool:
        if any(all(r.matches(pod.labels) for r in sel) for sel in self.selectors):
            return True
        return any(k in pod.annotations and (v is None or pod.annotations[k] == v) for k, v in self.annotations)

    def _selection_record(self, pods: int) -> dict:
        return {"ok": True, "node": self.node, "pods": pods,
                "selected": [{"uid": p.uid, "namespace": p.namespace, "pod": p.name}
                             for p in sorted(self.selected.values(), key=lambda p: (p.namespace, p.name))]}

    def _apply(self, pods: list[Pod]) -> list[dict]:
        self.pods = {p.uid: p for p in pods}
        # a pod that has ended keeps no cgroup: not looked for
        selected = {p.uid: p for p in pods if self.wants(p) and p.phase not in ("Succeeded", "Failed")}
        changed = set(selected) != set(self.selected)
        self.selected = selected
        self._names()
        return [self._selection_record(len(pods))] if changed else []

    def _names(self) -> None:
        if self.directory is not None:
            self.directory.learn({p.uid: (p.namespace, p.name) for p in self.pods.values()},
                                 {cid: (p.namespace, p.name, name) for p in self.pods.values()
                                  for cid, name in p.containers.items()})

    def start(self, background: bool = True) -> list[dict]:
        """The first list (raises KubeError: the watcher does not start without it), then the lister."""
        self._apply(self.api.list_pods(self.node))
        if background and self._thread is None:
            self._thread = threading.Thread(target=self._lister, name="agentprobe-kube", daemon=True)
            self._thread.start()
        return [self._selection_record(len(self.pods))]

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    def _lister(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._results.append((self.api.list_pods(self.node), None))
            except KubeError as e:
                self._results.append((None, str(e)))
            except Exception as e:  # a bug here must not end the lister silently
                self._results.append((None, f"listing pods: {type(e).__name__}: {e}"))
            self._stop.wait(MKDIR_REFRESH_S)  # asked again at once (new pod cgroups): at most this often

    def ask_now(self) -> None:
        """List again as soon as the lister can (a pod cgroup of a pod the last list did not have)."""
        self._wake.set()

    def _collect(self) -> list[dict]:
        out: list[dict] = []
        while self._results:
            pods, error = self._results.popleft()
            if error is not None:
                self.failures += 1
                out.append({"ok": False, "error": error, "failures": self.failures, "first": not self._failing,
                            "selected_kept": len(self.selected)})
                self._failing = True
                continue
            recs = self._apply(pods)
            if self._failing:
                self._failing = False
                recs = recs or [self._selection_record(len(pods))]
                recs[0]["recovered"] = True
            out += recs
        return out

    def refresh(self) -> list[dict]:
        """`kube` record fields of the lists that came in since: a change of selection, a failure
        (the last good selection stays), a recovery."""
        out, self._pending = self._pending + self._collect(), []
        return out

    def new_pod_cgroup(self, path: str) -> bool:
        """A cgroup was made (cgroup_mkdir): should the cgroups be scanned now? Yes for a selected pod
        not mapped yet. The pod cgroup of a pod the last list did not have makes the lister ask at
        once, so that by the time its first container's cgroup is made the pod is known."""
        pc = pod_cgroup(path)
        if pc is None:
            return False
        self._pending += self._collect()
        if pc.pod_uid not in self.pods:
            self.ask_now()
        return pc.pod_uid in self.selected and pc.pod_uid not in self._mapped

    def take_pending(self) -> list[dict]:
        out, self._pending = self._pending, []
        return out

    def cgroups(self, root: Path) -> dict[int, WatchedCgroup]:
        """The selected pods' own cgroups that exist now, by id."""
        out: dict[int, WatchedCgroup] = {}
        missing = [u for u in self.selected if u not in self._paths or not self._paths[u].is_dir()]
        if missing:
            self._paths.update(find_pod_cgroups(root, set(missing)))
        self._mapped = set()
        for uid in self.selected:
            d = self._paths.get(uid)
            if d is None:
                continue
            try:
                cid = cgroup_id(d)
            except OSError:
                continue
            rel = "/" + str(d.relative_to(root))
            out[cid] = WatchedCgroup(cid, rel, rel.count("/"))
            self._mapped.add(uid)
        return out


def _req_text(r: Requirement) -> str:
    return {"exists": r.key, "!exists": f"!{r.key}"}.get(r.op) or f"{r.key}{r.op}{r.value}"


def find_pod_cgroups(root: Path, uids: set[str], max_depth: int = 8) -> dict[str, Path]:
    """uid -> the pod's own cgroup directory, for the uids found. Walks the top two levels and
    below them only directories on a kubepods path (the QoS levels of the cgroupfs driver too)."""
    found: dict[str, Path] = {}
    todo = [(root, 0, False)]
    while todo and len(found) < len(uids):
        d, depth, kube = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                continue
            path = Path(e.path)
            in_kube = kube or "kubepods" in e.name
            if in_kube:
                pc = pod_cgroup("/" + str(path.relative_to(root)))
                if pc is not None:
                    if pc.container_id is None and pc.pod_uid in uids:
                        found[pc.pod_uid] = path
                    continue  # nothing of another pod below a pod
            if depth + 1 < max_depth and (in_kube or depth < 2):
                todo.append((path, depth + 1, in_kube))
    return found
