"""The systemd unit, the Kubernetes DaemonSet, the Vagrantfile and the install script."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agentprobe.cgroups import glob_regex
from agentprobe.cli import watch
from agentprobe.config import load_config
from agentprobe.kube import pod_cgroup

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging/systemd/agentprobe.service"
DAEMONSET = REPO / "packaging/kubernetes/daemonset.yaml"
UID = "5f3c2a1b-8d4e-4f6a-9b7c-0123456789ab"
UID_ = UID.replace("-", "_")
CID = "3f4e5d6c" * 8


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str
    cp.read(UNIT)
    return cp


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit():
    r = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_unit_is_hardened_and_says_why_for_each_capability():
    s = unit()["Service"]
    caps = s["CapabilityBoundingSet"].split()
    assert set(caps) == {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE",
                         "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_KILL", "CAP_SYS_NICE"}
    text = UNIT.read_text()
    for cap in caps:
        assert re.search(rf"^# {cap}\s+\S", text, re.M), f"no reason given for {cap}"
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert s["ReadWritePaths"].split() == ["/var/log/agentprobe", "/run/agentprobe", "/sys/fs/cgroup"]
    assert s["ExecStart"].split()[:4] == ["/usr/local/bin/agentprobe", "watch", "--config",
                                          "/etc/agentprobe/config.yaml"]
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # what would break the watcher is left off, on purpose
    for key in ("ProtectKernelModules", "ProtectControlGroups", "MemoryDenyWriteExecute", "PrivateDevices",
                "RestrictRealtime"):
        assert key not in s


def test_daemonset_has_what_a_gpu_node_needs():
    docs = list(yaml.safe_load_all(DAEMONSET.read_text()))
    assert [d["kind"] for d in docs] == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                         "ConfigMap", "DaemonSet"]
    ds = docs[5]
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["automountServiceAccountToken"] is True
    # the API server: list this node's pods, nothing more
    assert docs[2]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    assert docs[3]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": docs[2]["metadata"]["name"]}
    assert docs[3]["subjects"] == [{"kind": "ServiceAccount", "name": docs[1]["metadata"]["name"],
                                    "namespace": docs[1]["metadata"]["namespace"]}]
    assert spec["serviceAccountName"] == docs[1]["metadata"]["name"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    assert c["args"] == ["watch", "--config", "/etc/agentprobe/config.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in ("/sys/fs/cgroup", "/sys/kernel/btf", "/sys/kernel/debug", "/sys/kernel/tracing", "/lib/modules",
                 "/usr/src", "/var/log/pods", "/var/log/containers", "/var/log/agentprobe", "/run/agentprobe"):
        vol = volumes[mounts[path]["name"]]
        assert vol["hostPath"]["path"] == path
    assert not mounts["/sys/fs/cgroup"].get("readOnly")  # the freeze writes there
    assert mounts["/lib/modules"]["readOnly"] and mounts["/var/log/pods"]["readOnly"]
    assert c["ports"][0]["containerPort"] == 9477


def test_daemonset_configs_are_valid_and_their_globs_match_real_pod_cgroups(tmp_path):
    cm = list(yaml.safe_load_all(DAEMONSET.read_text()))[4]
    assert set(cm["data"]) == {"config.yaml", "config-all-containers.yaml"}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(cm["data"]["config.yaml"])
    values = load_config(cfg, watch)
    assert values["metrics_addr"] == "0.0.0.0:9477" and values["no_view"] is True
    assert values["kube_pods"] is True and "globs" not in values  # agent pods by annotation or label
    cfg.write_text(cm["data"]["config-all-containers.yaml"])
    values = load_config(cfg, watch)
    assert values["metrics_addr"] == "0.0.0.0:9477" and "kube_pods" not in values
    globs = [glob_regex(g) for g in values["globs"]]
    real = [
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        f"kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
        # the cgroupfs driver: containerd's bare id, CRI-O's crio-<id>; Guaranteed pods right under kubepods
        f"kubepods/burstable/pod{UID}/{CID}",
        f"kubepods/besteffort/pod{UID}/{CID}",
        f"kubepods/pod{UID}/{CID}",
        f"kubepods/burstable/pod{UID}/crio-{CID}",
    ]
    for path in real:
        assert any(g.fullmatch(path) for g in globs), path
        assert pod_cgroup("/" + path).container_id == CID  # what the globs match is a container's cgroup
    # not the node's services, nor the pod and QoS levels (a pod's cgroup holds no process of its own)
    for path in ("system.slice/containerd.service", "kubepods", "kubepods/burstable", f"kubepods/burstable/pod{UID}",
                 f"kubepods/pod{UID}", "kubepods.slice/kubepods-burstable.slice"):
        assert not any(g.fullmatch(path) for g in globs), path


@pytest.mark.skipif(shutil.which("vagrant") is None,
                    reason="vagrant is not installed (scripts/install.sh --test installs it where packaged)")
def test_vagrant_validates_the_vagrantfile(tmp_path):
    env = {**os.environ, "VAGRANT_CWD": str(REPO), "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant"),
           "VAGRANT_CHECKPOINT_DISABLE": "1"}
    r = subprocess.run(["vagrant", "validate", "--ignore-provider"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "Vagrantfile validated successfully" in r.stdout, r.stdout + r.stderr


def test_vagrantfile_brings_up_ubuntu_lts_with_the_install_script():
    text = (REPO / "Vagrantfile").read_text()
    assert re.search(r'^\s*config\.vm\.box = "bento/ubuntu-24\.04"', text, re.M)
    blocks = dict(re.findall(r'config\.vm\.provision "(\w+)".*?<<-SHELL\n(.*?)\n\s*SHELL', text, re.S))
    install = [ln.strip() for ln in blocks["install"].splitlines()]
    assert install[:3] == ["set -e", "cd /vagrant", "scripts/install.sh --test"]
    test = [ln.strip() for ln in blocks["test"].splitlines()]
    assert test == ["set -e", "cd /vagrant", "AGENTPROBE_VM_KERNELS= scripts/test.sh", "agentprobe demo"]
    # the README gives the same commands
    assert ("vagrant up && vagrant ssh -c 'cd /vagrant && sudo AGENTPROBE_VM_KERNELS= scripts/test.sh "
            "&& sudo agentprobe demo'") in (REPO / "README.md").read_text()


def test_install_script_knows_ubuntu_and_debian_package_names():
    text = (REPO / "scripts/install.sh").read_text()
    r = subprocess.run(["bash", "-n", str(REPO / "scripts/install.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "python3-bpfcc bpfcc-tools" in text and "nats-server" in text
    assert re.search(r'ubuntu\) pkgs\+=\(linux-tools-common\)', text)  # bpftool lives there on Ubuntu
    assert 'linux-headers-$KREL' in text and 'linux-tools-$KREL' in text
