"""Per-process GPU memory and utilisation from NVML, for agent processes.

Ioctls show that a process set up a CUDA context and allocated memory, not how
hard it drives the GPU: kernel launches go through mmapped doorbells. Where an
NVIDIA driver and `nvidia-ml-py` are present, this sampler adds `gpu` records
of kind `nvml` for agent pids. Everywhere else it says why it is off, once.
"""

from __future__ import annotations

from collections.abc import Callable


class NvmlSampler:
    def __init__(self, loader: Callable[[], object] | None = None) -> None:
        self.available = False
        self.reason = ""
        self._nvml = None
        self._handles: list[tuple[int, str, object]] = []
        self._last_ts: dict[int, int] = {}
        try:
            nvml = loader() if loader else __import__("pynvml")
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            nvml.nvmlInit()
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = nvml.nvmlDeviceGetUUID(h)
                self._handles.append((i, uuid.decode() if isinstance(uuid, bytes) else str(uuid), h))
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.reason = f"NVML unavailable: {e}"
            return
        self._nvml = nvml
        self.available = True
        self.reason = f"{len(self._handles)} GPU(s)"

    def sample(self, is_agent: Callable[[int], bool]) -> list[dict]:
        """One entry per (agent pid, GPU) that NVML reports: memory and utilisation. `is_agent` is
        asked only about the processes NVML lists, once each per sample."""
        if not self.available:
            return []
        known: dict[int, bool] = {}

        def wanted(pid: int) -> bool:
            if pid not in known:
                known[pid] = bool(is_agent(pid))
            return known[pid]

        out = []
        nvml = self._nvml
        for index, uuid, h in self._handles:
            used: dict[int, int | None] = {}
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    for p in getattr(nvml, getter)(h):
                        if wanted(p.pid):
                            used[p.pid] = getattr(p, "usedGpuMemory", None)
                except Exception:
                    continue
            util: dict[int, tuple[int, int]] = {}
            try:
                samples = nvml.nvmlDeviceGetProcessUtilization(h, self._last_ts.get(index, 0))
                for s in samples:
                    if wanted(s.pid):
                        util[s.pid] = (s.smUtil, s.memUtil)
                    self._last_ts[index] = max(self._last_ts.get(index, 0), s.timeStamp)
            except Exception:
                pass  # no samples since the last call, or not supported on this GPU
            for pid in sorted(set(used) | set(util)):
                sm, mem = util.get(pid, (None, None))
                out.append({"pid": pid, "device": {"index": index, "uuid": uuid},
                            "used_memory": used.get(pid), "sm_util": sm, "mem_util": mem})
        return out

    def close(self) -> None:
        if self.available:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self.available = False

