"""Agent pods chosen by label or annotation on the Kubernetes API server (agentprobe/kubeapi.py): a real
HTTP(S) server on loopback answering the node's pod list, the pods' cgroups laid out as the kubelet makes them."""

from __future__ import annotations

import signal
import time

import pytest

from agentprobe.kube import PodDirectory

UID = "5f3c2a1b-8d4e-4f6a-9b7c-0123456789ab"
CID = "3f4e5d6c" * 8

NODE = "gpu-node-7"


def pod_json(uid: str, ns: str, name: str, containers: dict[str, str], labels: dict | None = None,
             annotations: dict | None = None, runtime: str = "containerd", node: str = NODE,
             qos: str = "Burstable") -> dict:
    """One item of a v1 PodList as the API server sends it (fields agentprobe does not read included)."""
    return {
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "48213",
                     "creationTimestamp": "2026-12-03T06:00:00Z", "labels": labels or {},
                     "annotations": annotations or {},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name[:-6],
                                          "uid": "0" * 8 + "-0000-4000-8000-" + "0" * 12, "controller": True}]},
        "spec": {"nodeName": node, "serviceAccountName": "default", "restartPolicy": "Always",
                 "containers": [{"name": n, "image": "python:3.12-slim"} for n in containers.values()]},
        "status": {"phase": "Running", "qosClass": qos, "hostIP": "192.0.2.7", "podIP": "198.51.100.23",
                   "containerStatuses": [{"name": n, "ready": True, "restartCount": 0, "image": "python:3.12-slim",
                                          "containerID": f"{runtime}://{cid}", "started": True,
                                          "state": {"running": {"startedAt": "2026-12-03T06:00:02Z"}}}
                                         for cid, n in containers.items()]},
    }


def pod_list(items: list[dict]) -> bytes:
    import json

    return json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "48217"},
                       "items": items}).encode()


class PodListServer:
    """A real HTTP(S) server on loopback answering GET /api/v1/pods?fieldSelector=spec.nodeName=NODE
    with `self.items`, or with what `self.mode` says: 'ok', 'forbidden' (403 and the API's Status),
    'garbage' (200, not JSON). Requests without the right bearer token get 401."""

    def __init__(self, tmp_path, tls: bool = True, token: str = "sa-token-8c1f") -> None:
        import ssl
        import subprocess
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.items: list[dict] = []
        self.mode = "ok"
        self.requests: list[str] = []
        self.sa_dir = tmp_path / "serviceaccount"
        self.sa_dir.mkdir()
        (self.sa_dir / "token").write_text(token + "\n")
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                import json

                server.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {token}":
                    return self._send(401, json.dumps({"kind": "Status", "message": "Unauthorized"}).encode())
                if server.mode == "forbidden":
                    return self._send(403, json.dumps({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                        "message": 'pods is forbidden: User "system:serviceaccount:agentprobe:agentprobe" cannot '
                                   'list resource "pods" in API group "" at the cluster scope'}).encode())
                if server.mode == "garbage":
                    return self._send(200, b"<html>502 Bad Gateway</html>")
                if self.path != f"/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}":
                    return self._send(400, b"{}")
                self._send(200, pod_list([i for i in server.items if i["spec"]["nodeName"] == NODE]))

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls:  # the API server's own CA, as the service account's ca.crt carries it
            key, crt = tmp_path / "apiserver.key", self.sa_dir / "ca.crt"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                            str(crt), "-days", "1", "-subj", "/CN=kubernetes", "-addext",
                            "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(crt, key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_server(tmp_path):
    """HTTPS with its own CA, as in a cluster (openssl makes the certificate)."""
    s = PodListServer(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def plain_api_server(tmp_path):
    """Plain HTTP, for the kernel tests: the VM that runs them has no openssl; TLS is tested above."""
    s = PodListServer(tmp_path, tls=False)
    try:
        yield s
    finally:
        s.close()


def new_uid() -> str:
    import uuid

    return str(uuid.uuid4())


def test_label_selectors_and_annotations():
    from agentprobe.kubeapi import KubeError, Pod, PodSelection, parse_selector

    assert [(r.key, r.op, r.value) for r in parse_selector("app=rl-agent, tier!=infra,gpu,!canary")] == [
        ("app", "=", "rl-agent"), ("tier", "!=", "infra"), ("gpu", "exists", ""), ("canary", "!exists", "")]
    for bad in ("app=", "=x", "a b", "!app=x", "app=x,", "app in (a,b)"):
        if bad == "app=":  # an empty value is a valid selector (the label is there, empty)
            assert parse_selector(bad)[0].value == ""
            continue
        with pytest.raises(KubeError, match="is not a label selector"):
            parse_selector(bad)
    sel = PodSelection(None, NODE, ["app=rl-agent,!canary", "team=research"], ["agentprobe.io/watch=true"])
    pod = Pod(UID, "rl", "p")
    assert sel.wants(Pod(UID, "rl", "p", labels={"app": "rl-agent"}))
    assert not sel.wants(Pod(UID, "rl", "p", labels={"app": "rl-agent", "canary": ""}))
    assert sel.wants(Pod(UID, "rl", "p", labels={"team": "research"}))
    assert sel.wants(Pod(UID, "rl", "p", annotations={"agentprobe.io/watch": "true"}))
    assert not sel.wants(Pod(UID, "rl", "p", annotations={"agentprobe.io/watch": "false"}))
    assert not sel.wants(pod)


def test_selected_pods_map_to_their_cgroups_in_every_layout(tmp_path):
    """The pod list of a real HTTPS server; the pods' cgroups laid out as the kubelet makes them."""
    from agentprobe.kubeapi import KubeApi, PodSelection

    uids = [new_uid() for _ in range(5)]
    layouts = [  # (pod cgroup, container cgroup name, runtime), for systemd and cgroupfs drivers
        ("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice", "cri-containerd-{c}.scope",
         "containerd"),
        ("kubepods.slice/kubepods-pod{u_}.slice", "crio-{c}.scope", "cri-o"),
        ("kubepods/besteffort/pod{u}", "{c}", "containerd"),
        ("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
         "kubelet-kubepods-besteffort-pod{u_}.slice", "cri-containerd-{c}.scope", "containerd"),
    ]
    root = tmp_path / "cgroup"
    expected = {}
    s = PodListServer(tmp_path)
    try:
        for i, (pod_dir, ctr, runtime) in enumerate(layouts):
            u, cid = uids[i], f"{i:02x}" * 32
            d = root / "ns-parent" / pod_dir.format(u=u, u_=u.replace("-", "_"))
            (d / ctr.format(c=cid)).mkdir(parents=True)
            expected[u] = "/" + str(d.relative_to(root))
            s.items.append(pod_json(u, "rl", f"agent-{i}-7b9fx", {cid: "worker"}, labels={"app": "rl-agent"},
                                    runtime=runtime))
        # not selected: no label; and a pod of another node with the label
        (root / "kubepods" / "burstable" / f"pod{uids[4]}" / ("ff" * 32)).mkdir(parents=True)
        s.items.append(pod_json(uids[4], "rl", "other-abcde", {"ff" * 32: "worker"}))
        s.items.append(pod_json(new_uid(), "rl", "elsewhere-abcde", {}, labels={"app": "rl-agent"}, node="gpu-node-8"))
        done = pod_json(new_uid(), "rl", "finished-abcde", {}, labels={"app": "rl-agent"})  # ended: no cgroup
        done["status"]["phase"] = "Succeeded"
        s.items.append(done)
        sel = PodSelection(KubeApi(s.url, s.sa_dir), NODE, ["app=rl-agent"], [])
        (rec,) = sel.start(background=False)
        assert rec["ok"] and rec["pods"] == 6 and {p["uid"] for p in rec["selected"]} == set(uids[:4])
        got = {p for p in (c.path for c in sel.cgroups(root).values())}
        assert got == set(expected.values())
        # names go to the enricher's directory: the container's name from its status
        pods = PodDirectory(tmp_path / "no-logs")
        sel.directory = pods
        sel._names()
        info = pods.container_info(expected[uids[1]] + "/crio-" + "01" * 32 + ".scope")
        assert info == {"pod_uid": uids[1], "qos": "guaranteed", "runtime": "crio", "id": "01" * 32,
                        "namespace": "rl", "pod": "agent-1-7b9fx", "name": "worker"}
        assert s.requests[0] == f"/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}"
    finally:
        s.close()


def test_api_faults_are_one_clear_error_at_start_and_records_while_running(api_server, tmp_path):
    from natsutil import free_port

    from agentprobe.kubeapi import KubeApi, KubeError, PodSelection

    dead = free_port()
    with pytest.raises(KubeError) as e:
        KubeApi(f"https://127.0.0.1:{dead}", api_server.sa_dir).list_pods(NODE)
    assert str(e.value) == f"cannot reach the Kubernetes API https://127.0.0.1:{dead}: Connection refused"
    api = KubeApi(api_server.url, api_server.sa_dir)
    api_server.mode = "forbidden"
    with pytest.raises(KubeError) as e:
        api.list_pods(NODE)
    assert str(e.value) == (
        f"the Kubernetes API {api_server.url} refused to list the pods of node {NODE}: 403 Forbidden: pods is "
        'forbidden: User "system:serviceaccount:agentprobe:agentprobe" cannot list resource "pods" in API group "" '
        "at the cluster scope (the service account needs get and list on pods: "
        "see packaging/kubernetes/daemonset.yaml)")
    api_server.mode = "garbage"
    with pytest.raises(KubeError, match=r"sent no usable pod list: Expecting value"):
        api.list_pods(NODE)
    with pytest.raises(KubeError, match=r"TLS: CERTIFICATE_VERIFY_FAILED"):
        KubeApi(api_server.url, tmp_path).list_pods(NODE)  # no ca.crt: the system's CAs do not know it
    # while running (lists from the background thread): the last good selection stays; each failure is a
    # record, the first of a streak says so
    api_server.mode = "ok"
    api_server.items = [pod_json(UID, "rl", "a-12345", {CID: "worker"}, annotations={"agentprobe.io/watch": "true"})]
    sel = PodSelection(api, NODE, [], ["agentprobe.io/watch=true"], refresh_s=0.1)

    def records(until):
        got, deadline = [], time.monotonic() + 10
        while not until(got):
            assert time.monotonic() < deadline, got
            got += sel.refresh()
            time.sleep(0.02)
        return got

    try:
        assert [p["pod"] for p in sel.start()[0]["selected"]] == ["a-12345"]
        api_server.mode = "garbage"
        failed = records(lambda got: len(got) >= 2)
        r1, r2 = failed[:2]
        assert (r1["ok"], r1["first"], r1["failures"], r1["selected_kept"]) == (False, True, 1, 1)
        assert (r2["ok"], r2["first"], r2["failures"]) == (False, False, 2) and list(sel.selected) == [UID]
        api_server.mode = "ok"
        got = records(lambda got: any(r["ok"] for r in got))
        assert got[-1]["recovered"] and [p["pod"] for p in got[-1]["selected"]] == ["a-12345"]
        assert all(not r["ok"] for r in failed + got[:-1]) and sel.failures == len(failed) + len(got) - 1
        # a new pod cgroup of a pod the last list did not have: listed again at once, watched as soon as known
        sel.refresh_s = 3600
        time.sleep(0.8)  # the lister sleeps its full refresh now
        u2 = new_uid()
        api_server.items.append(pod_json(u2, "rl", "b-12345", {}, annotations={"agentprobe.io/watch": "true"}))
        path = f"/kubepods/burstable/pod{u2}"
        assert sel.new_pod_cgroup(path) is False  # asked for, not known yet
        deadline = time.monotonic() + 5
        while not sel.new_pod_cgroup(path):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert u2 in sel.selected and sel.refresh()[0]["selected"][1]["pod"] == "b-12345"
    finally:
        sel.close()


@pytest.mark.kernel
@pytest.mark.userland
def test_start_fails_in_one_line_when_the_api_server_cannot_be_used(agentprobe_cmd, plain_api_server, tmp_path):
    import subprocess

    from natsutil import free_port

    api_server = plain_api_server

    def watch(url):
        return subprocess.run([*agentprobe_cmd, "watch", "--no-view", "--duration", "1", "--pod-selector", "app=x",
                               "--kube-api", url, "--kube-credentials", str(api_server.sa_dir), "--node-name", NODE,
                               "-o", str(tmp_path / "s.msgpack"), "--status-dir", str(tmp_path / "st")],
                              capture_output=True, text=True, timeout=60)

    dead = free_port()
    r = watch(f"https://127.0.0.1:{dead}")
    assert (r.returncode, r.stderr) == (
        1, f"agentprobe: cannot reach the Kubernetes API https://127.0.0.1:{dead}: Connection refused\n")
    for mode, says in (("forbidden", "refused to list the pods of node gpu-node-7: 403 Forbidden: "),
                       ("garbage", "sent no usable pod list: ")):
        api_server.mode = mode
        r = watch(api_server.url)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"agentprobe: the Kubernetes API {api_server.url} {says}"), r.stderr
    assert not (tmp_path / "s.msgpack").exists()


@pytest.mark.kernel
@pytest.mark.userland
def test_watch_selects_pods_by_label_and_annotation_from_the_api_server(agent_cgroup, plain_api_server, tmp_path):
    """A real watcher asking a real HTTP server for the node's pods: a labelled pod (containerd, systemd
    driver) and an annotated one (CRI-O, cgroupfs driver) are watched, the third is not until it gets
    the label; an API outage while running is reported and keeps the pods watched."""
    from watcher import WatcherProcess

    from agentprobe.stream import read_records

    api_server = plain_api_server
    a, b, c = new_uid(), new_uid(), new_uid()
    ca, cb, cc = "a1" * 32, "b2" * 32, "c3" * 32
    kubepods = agent_cgroup.child("kubepods.slice")
    ctr_a = kubepods.child("kubepods-burstable.slice") \
        .child(f"kubepods-burstable-pod{a.replace('-', '_')}.slice").child(f"cri-containerd-{ca}.scope")
    ctr_b = kubepods.child("kubepods-besteffort.slice") \
        .child(f"kubepods-besteffort-pod{b.replace('-', '_')}.slice").child(f"cri-containerd-{cb}.scope")
    ctr_c = agent_cgroup.child("kubepods").child("burstable").child(f"pod{c}").child(f"crio-{cc}")
    api_server.items = [
        pod_json(a, "rl", "agent-a-5d8f9", {ca: "worker"}, labels={"app": "rl-agent"}),
        pod_json(b, "rl", "trainer-b-k2j4x", {cb: "trainer"}, qos="BestEffort"),
        pod_json(c, "sandbox", "agent-c-x9q2w", {cc: "tools"}, annotations={"agentprobe.io/watch": "true"},
                 runtime="cri-o"),
    ]
    out = tmp_path / "s.msgpack"
    w = WatcherProcess(["--pod-selector", "app=rl-agent", "--kube-api", api_server.url, "--kube-credentials",
                        str(api_server.sa_dir), "--node-name", NODE, "--kube-refresh", "0.3", "--rescan", "0.3",
                        "--no-view", "-o", str(out), "--status-dir", str(tmp_path / "st")])

    def execs():
        return [r for r in read_records(str(out)) if r["type"] == "exec"]

    def wait(pred, what):
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def said(text):
        w._readline(0.1)
        return any(text in ln for ln in w.stderr_lines)

    try:
        for ctr, word in ((ctr_a, "in-a"), (ctr_b, "in-b"), (ctr_c, "in-c")):
            ctr.run(["/bin/echo", word])
        wait(lambda: len(execs()) >= 2, "the execs in the selected pods")
        api_server.items[1]["metadata"]["labels"]["app"] = "rl-agent"  # b becomes an agent pod
        wait(lambda: any(r["type"] == "cgroup" and r["change"] == "watched" for r in read_records(str(out))),
             "b's pod cgroup watched")
        ctr_b.run(["/bin/echo", "in-b-labelled"])
        api_server.mode = "forbidden"
        wait(lambda: said("refused to list"), "the outage reported")
        ctr_a.run(["/bin/echo", "in-a-during-outage"])
        wait(lambda: len(execs()) >= 4, "the exec during the outage")
        api_server.mode = "ok"
        wait(lambda: said("answers again"), "the recovery")
    finally:
        rc, _, stderr = w.stop(signal.SIGINT)
    assert rc == 0, stderr
    recs = list(read_records(str(out)))
    seen = [(r["argv"][1], r["container"]["namespace"], r["container"]["pod"], r["container"]["name"],
             r["container"]["runtime"]) for r in recs if r["type"] == "exec"]
    assert sorted(seen[:2]) == [("in-a", "rl", "agent-a-5d8f9", "worker", "cri-containerd"),
                                ("in-c", "sandbox", "agent-c-x9q2w", "tools", "crio")]
    assert seen[2:] == [("in-b-labelled", "rl", "trainer-b-k2j4x", "trainer", "cri-containerd"),
                        ("in-a-during-outage", "rl", "agent-a-5d8f9", "worker", "cri-containerd")]
    start = recs[0]
    assert start["kube"] == {"api": api_server.url, "node": NODE, "selectors": ["app=rl-agent"],
                             "annotations": ["agentprobe.io/watch=true"]}
    assert sorted(c["path"] for c in start["cgroups"]) == sorted([str(ctr_a.rel).rsplit("/", 1)[0],
                                                                  str(ctr_c.rel).rsplit("/", 1)[0]])
    kube = [r for r in recs if r["type"] == "kube"]
    assert [p["pod"] for p in kube[0]["selected"]] == ["agent-a-5d8f9", "agent-c-x9q2w"]
    assert [p["pod"] for p in kube[1]["selected"]] == ["agent-a-5d8f9", "trainer-b-k2j4x", "agent-c-x9q2w"]
    failed = [r for r in recs if r["type"] == "kube" and not r["ok"]]
    assert failed and failed[-1]["failures"] == len(failed) and "403 Forbidden" in failed[0]["error"]
    assert all(r["selected_kept"] == 3 for r in failed)
    assert any(r.get("recovered") for r in kube)
    assert stderr.count("refused to list the pods") == 1  # once per outage, not once per refresh
    assert recs[-1]["type"] == "stop" and recs[-1]["lost_total"] == 0


def test_metrics_count_api_failures_and_selected_pods():
    from agentprobe.metrics import WatchMetrics

    m = WatchMetrics()
    assert "agentprobe_kube" not in m.render()  # not choosing pods on the API server: no such series
    for rec in ({"type": "kube", "ok": True, "selected": [{"uid": UID}, {"uid": "x"}]},
                {"type": "kube", "ok": False, "error": "e", "failures": 1},
                {"type": "kube", "ok": False, "error": "e", "failures": 2}):
        m.write_record(rec, b"")
    lines = m.render().splitlines()
    assert "agentprobe_kube_selected_pods 2" in lines and "agentprobe_kube_api_errors_total 2" in lines
