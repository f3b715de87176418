"""Slow work off the record loop: hashing a binary, reading /proc or a file that an agent serves
(FUSE) can take seconds or never end. A stage hands such work to a SlowWork pool and looks at the
job again on a later turn of the loop (Stage.tick); once the job's deadline has passed it judges
without the result. The loop never waits on a job."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

_PENDING, _DONE, _FAILED = 0, 1, 2


class Job:
    """One piece of work: `done()` once it finished (`result()` or its exception in `error`);
    `expired()` once its deadline passed without it finishing."""

    __slots__ = ("fn", "args", "deadline", "_state", "_value", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple, deadline: float) -> None:
        self.fn = fn
        self.args = args
        self.deadline = deadline  # time.monotonic()
        self._state = _PENDING
        self._value: Any = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def ok(self) -> bool:
        return self._state == _DONE

    def expired(self, now: float | None = None) -> bool:
        return self._state == _PENDING and (time.monotonic() if now is None else now) >= self.deadline

    def result(self) -> Any:
        if self._state != _DONE:
            raise RuntimeError("the job has not finished" if self._state == _PENDING else f"the job failed: "
                               f"{self.error!r}")
        return self._value

    def _run(self) -> None:
        try:
            self._value = self.fn(*self.args)
            self._state = _DONE
        except BaseException as e:  # said through the job, never in the worker thread
            self.error = e
            self._state = _FAILED


class SlowWork:
    """A few daemon threads and a bounded queue. A job that waited past its deadline is not started
    (counted in `skipped`); when the queue is full `submit` returns None (counted in `refused`): the
    caller judges without the result, as for an expired job. A thread stuck in a read that never
    returns is lost to the pool, which is why there are several and why nothing waits on them."""

    def __init__(self, threads: int = 2, max_queued: int = 1024, name: str = "agentprobe-slow") -> None:
        self.max_queued = max_queued
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.refused = 0
        self.skipped = 0
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any, deadline_s: float) -> Job | None:
        job = Job(fn, args, time.monotonic() + deadline_s)
        with self._cv:
            if self._closed or len(self._queue) >= self.max_queued:
                self.refused += 1
                return None
            self._queue.append(job)
            self._cv.notify()
        return job

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
            if job.expired():
                self.skipped += 1  # nobody will look at it any more
                continue
            job._run()

    def close(self) -> None:
        """Stop taking jobs; threads end after the job they run (a stuck one stays, a daemon)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
