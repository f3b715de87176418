"""Stateful detection rules for agent processes (Falco-style YAML, plus windows).

A rule file is a YAML list of items:

    - list: ssh_binaries                 # named values; sites widen them
      items: [ssh, dbclient]
    - list: ssh_binaries                 # in a later file: add to it
      append: true
      items: [plink]
    - macro: outbound_connect            # a named condition
      condition: evt.type = connect and not net.ip in allowed_networks
    - rule: ssh_outbound                 # an alert
      desc: ...
      condition: outbound_connect and proc.names intersects ssh_binaries
      output: "ssh to %net.dest by %proc.cmdline"
      priority: high                     # critical high medium low info
      tags: [network, T1021.004]         # MITRE ATT&CK ids become the alert's `mitre`
      action: freeze                     # alert (default), freeze, kill
      enabled: true
      dedup: 60s                         # no repeat for the same process within this time

Conditions compare typed fields (fields.py) with values, lists and macros
(condition.py). Beyond Falco a rule may carry

    count:    {by: process|cgroup, within: 60s, threshold: 20, distinct: net.dest}   # or sum: FIELD
    sequence: {by: process|process_tree|cgroup, within: 10m, order: strict|any,
               steps: [COND, COND, ...]}                                            # instead of condition

Files merge by name over the shipped default.yaml; a rule item without
`condition`/`sequence` modifies an existing rule. See docs/rules.md.

Public API: build_engine(), load_ruleset(), check_file(), list_rules(),
RuleEngine, RuleSet, RuleError, RuleInfo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from .engine import DEFAULT_DEDUP_S, EngineLimits, RuleEngine
from .loader import (
    Sources,
    add_list_items,
    default_rules_text,
    load_sources,
    merge,
    parse_file,
    read_rule_file,
)
from .model import RuleError, RuleInfo
from .ruleset import Rule, RuleSet, compile_sources

__all__ = ["deny_policy", "EngineLimits", "Rule", "RuleEngine", "RuleError", "RuleInfo", "RuleSet", "build_engine",
           "check_file", "default_rules_text", "list_rules", "load_ruleset"]

SSH_CLIENT_NAMES = "ssh_client_binaries"
SSH_CLIENT_HASHES = "ssh_client_sha256"
DNS_RESOLVERS = "dns_resolvers"


def resolv_conf_nameservers(path: str | Path = "/etc/resolv.conf") -> list[str]:
    """The nameserver addresses of resolv.conf (valid IPs only)."""
    import ipaddress

    out: list[str] = []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            addr = parts[1].split("%")[0]
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                continue
            if addr not in out:
                out.append(addr)
    return out


def load_ruleset(paths: Iterable[str | Path] = (), *, defaults: bool = True,
                 extra_lists: Mapping[str, Iterable[object]] | None = None) -> RuleSet:
    """The shipped rules (unless defaults=False), then each file in order, compiled.

    extra_lists appends items to lists already defined, for values only known
    at run time (e.g. {"ssh_client_sha256": [sha256 of /usr/bin/ssh]}).
    Raises RuleError with a one-line `FILE:LINE: ...` message.
    """
    return compile_sources(load_sources(paths, defaults=defaults, extra_lists=extra_lists))


def check_file(path: str | Path, *, defaults: bool = True) -> RuleSet:
    """Validate one rule file: on its own (syntax, keys, conditions, fields, regexes,
    duplicates, macro cycles), then merged over the defaults (every reference
    resolved, everything compiled). Returns the merged RuleSet; raises RuleError."""
    text, name = read_rule_file(path)
    parsed = parse_file(text, name)
    sources = load_sources((), defaults=defaults)
    merge(sources, parsed)
    return compile_sources(sources)


def list_rules(ruleset: RuleSet) -> list[RuleInfo]:
    """id, name, priority, action, ATT&CK ids, tags, desc, enabled, kind and origin of every rule."""
    return ruleset.describe()


def local_binary_hashes(names: Iterable[str]) -> list[str]:
    """sha256 of the programs PATH finds for `names` (missing ones skipped)."""
    out: list[str] = []
    for name in names:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            digest = hashlib.sha256(Path(path).resolve().read_bytes()).hexdigest()
        except OSError:
            continue
        if digest not in out:
            out.append(digest)
    return out


# names list -> hash list: the node's own copies of these programs are hashed at start
LOCAL_HASHED = {SSH_CLIENT_NAMES: SSH_CLIENT_HASHES, "tunnel_binaries": "tunnel_sha256",
                "shell_exe_names": "shell_sha256", "text_search_binaries": "text_tool_sha256"}


def _add_local_ssh_hashes(sources: Sources) -> None:
    for names_list, hashes_list in LOCAL_HASHED.items():
        if names_list not in sources.lists or hashes_list not in sources.lists:
            continue
        # a throw-away compile of the names list expands nested lists the same way the rules will
        names = compile_sources(Sources(lists=dict(sources.lists))).lists[names_list]
        add = [h for h in local_binary_hashes(names) if h not in sources.lists[hashes_list].items]
        if add:
            add_list_items(sources, hashes_list, add)


def build_engine(paths: Iterable[str | Path] = (), *, with_defaults: bool = True,
                 extra_lists: Mapping[str, Iterable[object]] | None = None, hash_local_ssh: bool = True,
                 dedup_window_s: float = DEFAULT_DEDUP_S, limits: EngineLimits | None = None,
                 actions: Mapping[str, str] | None = None) -> RuleEngine:
    """The watcher's rule stage: rules loaded as load_ruleset() does, and (hash_local_ssh) the
    sha256 of this node's SSH clients added to `ssh_client_sha256`, so a renamed copy is still an
    SSH client. `actions` (rule id -> action) replaces the action of rules that are loaded, for
    options of the command line (`watch --on-loss`). Raises RuleError."""
    sources = load_sources(paths, defaults=with_defaults, extra_lists=extra_lists)
    for rule_id, action in (actions or {}).items():
        rdef = sources.rules.get(rule_id)
        if rdef is not None and rdef.spec is not None:
            rdef.spec = dataclasses.replace(rdef.spec, action=action)
    if hash_local_ssh:
        _add_local_ssh_hashes(sources)
        if DNS_RESOLVERS in sources.lists:  # this node's resolvers are where agents' DNS should go
            add = [a for a in resolv_conf_nameservers() if a not in sources.lists[DNS_RESOLVERS].items]
            if add:
                add_list_items(sources, DNS_RESOLVERS, add)
    return RuleEngine(compile_sources(sources), dedup_window_s=dedup_window_s, limits=limits)


# ports whose connects are always recorded one by one, never counted as part of a sweep: DNS (the
# DNS rules), and the ports the rule lists name
ALWAYS_RECORDED = (53,)
RECORDED_PORT_LISTS = ("interactive_session_ports", "mining_pool_ports")


def recorded_ports(ruleset: RuleSet) -> tuple[int, ...]:
    ports = set(ALWAYS_RECORDED)
    for name in RECORDED_PORT_LISTS:
        for item in ruleset.lists.get(name, ()):
            lo, _, hi = str(item).partition("-")
            ports.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(ports))


def deny_policy(ruleset: RuleSet) -> dict | None:
    """What the kernel refuses, from the rule lists: pool ports outside allowed_networks (when the
    mining_pool_connection rule is on) and mining_pool_hosts."""
    rule = ruleset.get("mining_pool_connection")
    if rule is None or not rule.enabled:
        return None
    ports: list[int] = []
    for item in ruleset.lists.get("mining_pool_ports", ()):
        lo, _, hi = str(item).partition("-")
        ports += range(int(lo), int(hi or lo) + 1)
    miner = ruleset.get("miner_binary_started")
    names = [n for n in ruleset.lists.get("miner_binaries", ()) if "*" not in n and "?" not in n]
    return {"ports": sorted(set(ports)), "allow": list(ruleset.lists.get("allowed_networks", ())),
            "deny": list(ruleset.lists.get("mining_pool_hosts", ())),
            "exec_names": names if miner is not None and miner.enabled else []}
