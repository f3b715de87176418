"""Busy agents are read without a wake-up per record: the real programs on the real kernel."""

from __future__ import annotations

import ctypes as ct
import subprocess
import sys
import time

import pytest

from agentprobe.events import ExecEvent, decode

pytestmark = pytest.mark.kernel

STORM = "for i in $(seq 400); do /bin/true storm; done"


def polling_flag(cap) -> int:
    return cap.probes._bpf[b"watcher_polling"][ct.c_int(0)].value


def test_a_busy_agent_is_read_by_polling_a_quiet_one_still_wakes_the_reader_and_it_can_be_off(agent_cgroup):
    from kernelutil import Capture

    cap = Capture(buffer="ringbuf")
    # what counts as busy is a rate (800 records/s by default); an emulated VM execs slower than that
    cap.probes.BUSY_RECORDS, cap.probes.BUSY_WINDOW_S = 8, 0.5
    try:
        cap.watch(agent_cgroup)
        assert polling_flag(cap) == 0
        # 400 execs as fast as a shell runs them: the reader turns to polling and tells the kernel
        p = agent_cgroup.popen(["/bin/sh", "-c", STORM])
        flags = set()
        while p.poll() is None:
            cap.probes.poll(100)
            flags.add(polling_flag(cap))
        storm = [e for e in cap.settle(0.3) if isinstance(e, ExecEvent) and e.argv == ["/bin/true", "storm"]]
        assert 1 in flags
        # none lost, in the kernel's order, and after 0.3 s of quiet the records wake the reader again
        assert len(storm) == 400 and [e.ktime_ns for e in storm] == sorted(e.ktime_ns for e in storm)
        assert polling_flag(cap) == 0 and not cap.probes._busy
        # one exec in a quiet episode wakes the reader at once (not at the end of its 5 s wait)
        cap.raw.clear()
        q = agent_cgroup.popen([sys.executable, "-c", "import os, sys; sys.stdin.read(1); "
                                "os.execv('/bin/true', ['/bin/true', 'alone'])"], stdin=subprocess.PIPE)
        cap.wait(lambda e: isinstance(e, ExecEvent) and e.proc.pid == q.pid)
        cap.raw.clear()
        q.stdin.write(b"x")
        q.stdin.flush()
        t0 = time.monotonic()
        while not any(isinstance(e, ExecEvent) and e.argv == ["/bin/true", "alone"] for e in map(decode, cap.raw)):
            cap.probes.poll(5000)
            assert time.monotonic() - t0 < 2.5
        assert time.monotonic() - t0 < 0.5
        q.wait()
        # busy polling off (--busy-poll-ms 0): the same storm, and the reader never tells the kernel it polls
        cap.probes.busy_poll = False
        cap.raw.clear()
        p = agent_cgroup.popen(["/bin/sh", "-c", STORM])
        while p.poll() is None:
            cap.probes.poll(100)
            assert polling_flag(cap) == 0
        storm = [e for e in cap.settle(0.3) if isinstance(e, ExecEvent) and e.argv == ["/bin/true", "storm"]]
        assert len(storm) == 400
    finally:
        cap.close()

