"""Pods and containers from cgroup paths and the kubelet's log directories, in the real formats."""

from __future__ import annotations

import os
import signal
import time

import pytest

from agentprobe.kube import LOG_DIR_ENV, PodCgroup, PodDirectory, pod_cgroup

UID = "5f3c2a1b-8d4e-4f6a-9b7c-0123456789ab"
UID_ = UID.replace("-", "_")
CID = "3f4e5d6c" * 8
CID2 = "a1b2c3d4" * 8


@pytest.mark.parametrize("path, expected", [
    # containerd, systemd cgroup driver
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, "burstable", "cri-containerd", CID)),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, "guaranteed", "cri-containerd", CID)),
    # containerd, cgroupfs driver
    (f"/kubepods/besteffort/pod{UID}/{CID}", PodCgroup(UID, "besteffort", "containerd", CID)),
    (f"/kubepods/pod{UID}/{CID}", PodCgroup(UID, "guaranteed", "containerd", CID)),
    # CRI-O, both drivers, and its monitor
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
     PodCgroup(UID, "besteffort", "crio", CID)),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope",
     PodCgroup(UID, "besteffort", "crio-conmon", CID)),
    (f"/kubepods/burstable/pod{UID}/crio-{CID}", PodCgroup(UID, "burstable", "crio", CID)),
    # a process in a sub-cgroup of the container (an agent's own episode cgroups)
    (f"/kubepods/burstable/pod{UID}/{CID}/episodes/ep-3", PodCgroup(UID, "burstable", "containerd", CID)),
    # the pod's own cgroup, and under a prefix (kind, nested runtimes)
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice", PodCgroup(UID, "burstable")),
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, "besteffort", "cri-containerd", CID)),
    (f"/system.slice/docker-{CID}.scope", None),
    ("/agents/ep-17", None),
])
def test_cgroup_paths(path, expected):
    assert pod_cgroup(path) == expected


def kubelet_logs(root, pods: dict[str, tuple[str, str, dict[str, str]]]) -> None:
    """The kubelet's layout: pods/<ns>_<pod>_<uid>/<container>/0.log and the containers/ links."""
    (root / "pods").mkdir(parents=True, exist_ok=True)
    (root / "containers").mkdir(exist_ok=True)
    for uid, (ns, pod, containers) in pods.items():
        for name, cid in containers.items():
            d = root / "pods" / f"{ns}_{pod}_{uid}" / name
            d.mkdir(parents=True)
            (d / "0.log").write_text("")
            os.symlink(d / "0.log", root / "containers" / f"{pod}_{ns}_{name}-{cid}.log")


def test_names_from_the_kubelet_log_directories(tmp_path):
    kubelet_logs(tmp_path, {UID: ("rl-agents", "agent-7b9f-x2k", {"worker": CID, "sidecar-proxy": CID2})})
    pods = PodDirectory(tmp_path)
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID2}.scope"
    assert pods.container_info(path) == {"pod_uid": UID, "qos": "burstable", "runtime": "cri-containerd", "id": CID2,
                                         "namespace": "rl-agents", "pod": "agent-7b9f-x2k", "name": "sidecar-proxy"}
    # the pause container (no logs) still gets its pod
    pause = "9" * 64
    info = pods.container_info(f"/kubepods/burstable/pod{UID}/{pause}")
    assert info["pod"] == "agent-7b9f-x2k" and "name" not in info


def test_a_pod_started_later_is_found_after_a_rescan(tmp_path, monkeypatch):
    import agentprobe.kube as kube

    monkeypatch.setattr(kube, "RESCAN_S", 0.0)
    pods = PodDirectory(tmp_path)
    path = f"/kubepods/pod{UID}/{CID}"
    assert pods.container_info(path) == {"pod_uid": UID, "qos": "guaranteed", "runtime": "containerd", "id": CID}
    kubelet_logs(tmp_path, {UID: ("default", "late", {"main": CID})})
    assert pods.container_info(path)["name"] == "main"


@pytest.mark.kernel
@pytest.mark.userland
def test_watch_names_pod_namespace_and_container(agent_cgroup, tmp_path, monkeypatch):
    """A real watcher, processes in cgroups laid out as containerd's systemd driver does."""
    from watcher import WatcherProcess

    from agentprobe.stream import read_records

    kubelet_logs(tmp_path / "log", {UID: ("rl-agents", "agent-0", {"worker": CID})})
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "log"))
    container = agent_cgroup.child("kubepods.slice").child("kubepods-burstable.slice") \
        .child(f"kubepods-burstable-pod{UID_}.slice").child(f"cri-containerd-{CID}.scope")
    out = tmp_path / "s.msgpack"
    w = WatcherProcess(["--cgroup", str(agent_cgroup.path), "--no-view", "-o", str(out), "-o",
                        f"jsonl:{tmp_path / 'e.jsonl'}", "--status-dir", str(tmp_path / "st")])
    try:
        container.run(["/bin/echo", "in a pod"])
        time.sleep(0.5)
    finally:
        rc, _, stderr = w.stop(signal.SIGINT)
    assert rc == 0, stderr
    (ex,) = [r for r in read_records(str(out)) if r["type"] == "exec"]
    assert ex["container"] == {"runtime": "cri-containerd", "id": CID, "pod_uid": UID, "qos": "burstable",
                               "namespace": "rl-agents", "pod": "agent-0", "name": "worker"}
    import json

    (doc,) = [d for d in map(json.loads, (tmp_path / "e.jsonl").read_text().splitlines())
              if d["event"]["action"] == "exec"]
    assert doc["orchestrator"] == {"type": "kubernetes", "namespace": "rl-agents",
                                   "resource": {"type": "pod", "name": "agent-0", "id": UID}}
    assert doc["container"] == {"id": CID, "runtime": "cri-containerd", "name": "worker"}
