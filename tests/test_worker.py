"""SlowWork: jobs run off the caller's thread, the caller never waits, deadlines and bounds hold."""

from __future__ import annotations

import os
import threading
import time

from agentprobe.worker import SlowWork


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_a_job_runs_on_another_thread_and_its_result_is_read_later():
    pool = SlowWork(threads=1)
    try:
        job = pool.submit(lambda a, b: (a + b, threading.get_ident()), 2, 3, deadline_s=5)
        assert wait_for(job.done)
        value, ident = job.result()
        assert value == 5 and ident != threading.get_ident() and job.ok() and not job.expired()
    finally:
        pool.close()


def test_submit_never_waits_for_a_read_that_never_returns(tmp_path):
    """A FIFO nobody writes to: open() blocks for ever in the worker; the caller goes on at once,
    sees the job expire at its deadline, and the other thread still serves new jobs."""
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    pool = SlowWork(threads=2)
    try:
        t0 = time.monotonic()
        stuck = pool.submit(lambda p: open(p).read(), str(fifo), deadline_s=0.2)
        assert time.monotonic() - t0 < 0.1  # submit returned without waiting
        assert not stuck.done()
        assert wait_for(lambda: stuck.expired(), 5)
        quick = pool.submit(os.getpid, deadline_s=5)
        assert wait_for(quick.done) and quick.result() == os.getpid()
    finally:
        pool.close()
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # lets the stuck open() return, so the thread ends
        os.close(fd)


def test_a_failing_job_reports_its_exception_through_the_job():
    pool = SlowWork(threads=1)
    try:
        job = pool.submit(lambda: 1 / 0, deadline_s=5)
        assert wait_for(job.done)
        assert not job.ok() and isinstance(job.error, ZeroDivisionError)
        try:
            job.result()
        except RuntimeError as e:
            assert "ZeroDivisionError" in str(e)
        else:
            raise AssertionError("result() of a failed job must raise")
    finally:
        pool.close()


def test_a_full_queue_refuses_and_counts_and_late_jobs_are_skipped_not_run():
    gate = threading.Event()
    ran = []
    pool = SlowWork(threads=1, max_queued=2)
    try:
        blocker = pool.submit(gate.wait, deadline_s=30)
        assert wait_for(lambda: len(pool._queue) == 0)  # the thread took it and waits on the gate
        late = [pool.submit(ran.append, i, deadline_s=0.05) for i in range(2)]
        assert pool.submit(ran.append, 99, deadline_s=5) is None and pool.refused == 1
        time.sleep(0.1)  # past the queued jobs' deadline
        assert all(j.expired() for j in late)
        gate.set()
        assert wait_for(lambda: pool.skipped == 2) and ran == [] and blocker.ok()
    finally:
        gate.set()
        pool.close()
