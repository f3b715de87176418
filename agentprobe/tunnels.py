"""Sessions carried by a local tunnel: SSH or stratum sent to a loopback port, or a shell whose
terminal is a socket to a loopback port, where an agent's process listens, is followed to where
that process (or a child it forked for the connection) goes, and reported as a `tunnel` record
(forwarders.py reads /proc for it). A relay that listens locally is judged by where it forwards."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .forwarders import Forwarder, find_forwarder, is_loopback, outside_peers
from .stage import Stage

CARRIED_APPS = ("ssh", "stratum")
MAX_PENDING = 256
RETRIES = 5
RETRY_S = 0.3


class LoopbackTunnels(Stage):
    """`agent_family()` gives live agent pids and their children by parent; `synthetic(type, pid,
    cgroup_id, ktime, fields)` makes a record as the enricher does."""

    name = "tunnels"

    def __init__(self, agent_family: Callable[[], tuple[list[int], dict[int, list[int]]]],
                 synthetic: Callable[..., dict]) -> None:
        self.agent_family = agent_family
        self.synthetic = synthetic
        # (when to look, tries, what is carried, the record that showed it, forwarder)
        self._pending: list[tuple[float, int, str, dict, Forwarder]] = []
        self._recent_dest: OrderedDict[int, list[str]] = OrderedDict()  # pid -> outside destinations

    def process(self, record: dict) -> list[dict]:
        t = record["type"]
        if t == "payload" and record.get("app") in CARRIED_APPS:
            self._watch(record["app"], record, (record.get("proc") or {}).get("pid") or 0,
                        record.get("address", ""), record.get("port", 0))
        elif t == "exec":
            stdio = (record.get("proc") or {}).get("stdio_socket")
            if isinstance(stdio, dict) and stdio.get("proto") == "tcp":  # the shell's terminal is a socket
                self._watch("shell", record, stdio.get("pid") or 0, stdio.get("peer_address") or "",
                            stdio.get("peer_port") or 0)
        elif t == "connect" and record.get("family") in ("inet", "inet6"):
            self._remember_dest(record)
        return []

    def _watch(self, carried: str, rec: dict, client: int, address: str, port: int) -> None:
        """`client` sent `carried` to loopback `port`: find the agent process that listens there now,
        before any response cuts connections; where it forwards to may only show a moment later."""
        if not client or not is_loopback(address) or len(self._pending) >= MAX_PENDING:
            return
        agents, children = self.agent_family()
        fwd = find_forwarder(client, port, agents, children)
        if fwd is None:
            return  # nobody of the agent's listens there (a node service)
        self._pending.append((time.monotonic(), 0, carried, rec, fwd))

    def _remember_dest(self, rec: dict) -> None:
        """Outside destinations each agent process connected to (the last 8), for naming relays."""
        addr, port, pid = rec.get("address") or "", rec.get("port"), (rec.get("proc") or {}).get("pid")
        if not pid or is_loopback(addr):
            return
        dests = self._recent_dest.setdefault(pid, [])
        self._recent_dest.move_to_end(pid)
        dest = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        if dest not in dests:
            dests.append(dest)
            del dests[:-8]
        if len(self._recent_dest) > 4096:
            self._recent_dest.popitem(last=False)

    def tick(self, now: float) -> list[dict]:
        """Name where each found forwarder goes (its and its children's outside peers, live or
        recorded); a relay that connects out only after the client came is looked at again a few
        times."""
        if not self._pending:
            return []
        due = [x for x in self._pending if x[0] <= now]
        if not due:
            return []
        self._pending = [x for x in self._pending if x[0] > now]
        _, children = self.agent_family()
        out = []
        for _, tries, carried, rec, fwd in due:
            family = [fwd.pid, *children.get(fwd.pid, [])]
            client = (rec.get("proc") or {}).get("pid") or 0
            for dest in outside_peers(client, family) + [d for p in family for d in self._recent_dest.get(p, [])]:
                if dest not in fwd.to:
                    fwd.to.append(dest)
            if not fwd.to and tries < RETRIES:
                self._pending.append((now + RETRY_S, tries + 1, carried, rec, fwd))
                continue
            out.append(self.synthetic("tunnel", fwd.pid, (rec.get("cgroup") or {}).get("id") or 0,
                                      time.monotonic_ns(), {
                "carried": carried, "port": fwd.port, "to": fwd.to, "forwarder_pids": family,
                "client": {"pid": client, "comm": (rec.get("proc") or {}).get("comm")},
                "detail": rec.get("banner") or rec.get("method") or " ".join(rec.get("argv") or []) or None,
                "payload_seq": rec.get("seq")}))
        return out
