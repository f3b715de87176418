"""NVML sampling: off with a reason where there is no driver; the sampling
logic against an object with pynvml's interface (no GPU on these machines)."""

from __future__ import annotations

from types import SimpleNamespace

from agentprobe.nvml import NvmlSampler


def test_without_nvidia_ml_py():
    def missing():
        raise ImportError("no pynvml")

    s = NvmlSampler(loader=missing)
    assert not s.available and "nvidia-ml-py is not installed" in s.reason
    assert s.sample({1, 2}.__contains__) == []


def test_without_a_driver():
    class NoDriver:
        def nvmlInit(self):
            raise RuntimeError("Driver Not Loaded")

    s = NvmlSampler(loader=NoDriver)
    assert not s.available and s.reason == "NVML unavailable: Driver Not Loaded"


class FakeNvml:
    """pynvml's calls as the real module makes them, with two GPUs."""

    def nvmlInit(self):
        self.down = False

    def nvmlShutdown(self):
        self.down = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"h{i}"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}".encode()

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=100, usedGpuMemory=2 << 30), SimpleNamespace(pid=999, usedGpuMemory=1)] \
            if h == "h0" else []

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []

    def nvmlDeviceGetProcessUtilization(self, h, last):
        if h != "h1":
            raise RuntimeError("Not Found")
        return [SimpleNamespace(pid=100, smUtil=97, memUtil=40, timeStamp=last + 5)]


def test_sampling_only_agent_pids():
    fake = FakeNvml()
    s = NvmlSampler(loader=lambda: fake)
    assert s.available and s.reason == "2 GPU(s)"
    got = s.sample({100, 200}.__contains__)
    assert got == [
        {"pid": 100, "device": {"index": 0, "uuid": "GPU-h0"}, "used_memory": 2 << 30, "sm_util": None,
         "mem_util": None},
        {"pid": 100, "device": {"index": 1, "uuid": "GPU-h1"}, "used_memory": None, "sm_util": 97, "mem_util": 40},
    ]
    # asked once per pid NVML lists, the answer kept for the sample
    asked = []
    assert s.sample(lambda pid: asked.append(pid) or pid == 100) == got
    assert sorted(asked) == sorted(set(asked)) and 100 in asked
    assert s.sample(lambda pid: False) == []
    s.close()
    assert fake.down and s.sample({100}.__contains__) == []
