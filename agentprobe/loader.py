"""Loads the eBPF programs through BCC and owns their maps.

The only module that imports BCC. Everything downstream receives raw records
(bytes) and plain values.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import abi
from .btf import kernel_offsets
from .cgroups import WatchedCgroup
from .countmaps import moved_entries, moved_gpu_counts, moved_sweeps
from .programs import (
    BPF_F_ALLOW_MULTI,
    CGROUP_PROGRAMS,
    IOCTL_TP_FN,
    IOCTL_TRACEPOINT,
    GpuProbeChoice,
    LoaderError,
    LoaderOptions,
    choose_gpu_probe,
    describe_paths,
    ebpf_dir,
    gpu_majors,
    kernel_at_least,
    lsm_cflags,
    main_cflags,
    name_key,
    program_text,
    with_extra_majors,
)

# importable from here, as before the split into programs.py
__all__ = ["LoaderError", "LoaderOptions", "ProbeSet", "ebpf_dir", "import_bcc", "program_text"]

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def import_bcc():
    """BCC's Python binding comes from the distribution (python3-bpfcc), not PyPI."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        if os.path.isdir(DIST_PACKAGES) and DIST_PACKAGES not in sys.path:
            sys.path.append(DIST_PACKAGES)
        try:
            import bcc  # noqa: F401,F811
        except ImportError:
            raise LoaderError(
                "BCC is not installed: apt-get install python3-bpfcc (Fedora: python3-bcc)"
            ) from None
    import bcc

    if not hasattr(bcc, "BPF"):
        raise LoaderError("the 'bcc' Python module is not BCC (PyPI's bcc is unrelated): "
                          "pip uninstall bcc; apt-get install python3-bpfcc")
    return bcc


def ensure_tracefs() -> None:
    """BCC attaches tracepoints through tracefs; fresh machines have it unmounted."""
    import subprocess

    for fstype, target in (("debugfs", "/sys/kernel/debug"), ("tracefs", "/sys/kernel/tracing"),
                           ("securityfs", "/sys/kernel/security")):
        if os.path.ismount(target):
            continue
        r = subprocess.run(["mount", "-t", fstype, "none", target], capture_output=True, text=True)
        if r.returncode != 0 and fstype == "tracefs":  # the others are optional
            raise LoaderError(f"cannot mount tracefs on {target}: {r.stderr.strip()}")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """libbpf prints a refusal itself; our own message says it better."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def fentry_refusal(bcc, fn: str) -> str | None:
    """None when the kernel loads and attaches an fentry program on `fn`, else why not."""
    try:
        with _quiet_stderr():
            b = bcc.BPF(text=f"KFUNC_PROBE({fn}, void *regs) {{ return 0; }}".encode())
            b.cleanup()
        return None
    except Exception as e:
        msg = str(e)
        if "privileges" in msg:
            return f"EPERM (kernel lockdown: {_lockdown()})"
        return msg.splitlines()[0] if msg else type(e).__name__


def _lockdown() -> str:
    try:
        return Path("/sys/kernel/security/lockdown").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def detach_stale(cgroup_dir: str) -> int:
    """Detach agentprobe programs a previous watcher left on a cgroup (cgroup
    attachments outlive their loader when it is killed). Returns how many."""
    import json
    import subprocess

    try:
        r = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup_dir], capture_output=True, text=True)
        entries = json.loads(r.stdout.strip() or "[]")
    except (OSError, ValueError):
        return 0
    names = {name[:15] for name, _, _ in CGROUP_PROGRAMS}
    n = 0
    for e in entries:
        if e.get("name") in names:
            subprocess.run(["bpftool", "cgroup", "detach", cgroup_dir, e.get("attach_type", ""),
                            "id", str(e.get("id"))], capture_output=True)
            n += 1
    return n


class ProbeSet:
    """The compiled programs, attached; call close() on every exit path."""

    # Busy: BUSY_RECORDS records within BUSY_WINDOW_S (800/s: then being woken would cost agents
    # more than our polling costs the node). Isolated records (an attack in a quiet episode) keep
    # waking us at once. No record for BUSY_IDLE_S: quiet again.
    BUSY_RECORDS = 16
    BUSY_WINDOW_S = 0.02
    BUSY_IDLE_S = 0.05

    def __init__(self, options: LoaderOptions, on_record: Callable[[bytes], None],
                 cgroup_root: Path | None = None) -> None:
        self.options = options
        self.cgroup_root = cgroup_root
        self._cg_fns: list = []
        self._attached: dict[int, int] = {}  # cgroup id -> directory fd with our programs attached
        self._lsm = None
        self.lsm_status = "off"
        self._on_record = on_record
        self.records_read = 0
        self._deny_gen = 0
        # busy polling (see poll()): off with busy_poll_ms 0, and with the perf buffer
        self.busy_poll = options.busy_poll_ms > 0
        self.BUSY_POLL_MS = max(1, options.busy_poll_ms)
        self._busy = False
        self.on_busy: Callable[[bool], None] | None = None
        self._last_read = 0.0
        self._window_start = 0.0
        self._window_records = 0
        self._grace_until = 0.0
        self.bcc = import_bcc()
        ensure_tracefs()
        self.offsets = kernel_offsets()
        self.buffer = ""
        self._bpf = None
        self._gpu_last: dict[tuple, int] = {}
        self._conn_last: dict[bytes, tuple] = {}
        self._flow_last: dict[bytes, tuple] = {}
        self._sweep_last: dict[int, int] = {}
        self.gpu_probe = ""  # fentry | on-demand | always, once loaded
        self.ioctl_attached = False
        self.paths: dict[str, str] = {}
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _compile(self, ringbuf: bool):
        fentry_fn = self.gpu.ioctl_fn if self.gpu.probe == "fentry" else ""
        flags = main_cflags(self.offsets, self.options, ringbuf, kernel_at_least(5, 11), fentry_fn)
        return self.bcc.BPF(text=program_text().encode(), cflags=flags)

    def _load(self) -> None:
        self.options.check()
        want = self.options.buffer
        self.gpu = choose_gpu_probe(self.options.gpu_probe, self.offsets, lambda fn: fentry_refusal(self.bcc, fn))
        self.gpu_probe = self.gpu.probe
        ringbuf_ok = want in ("auto", "ringbuf") and kernel_at_least(5, 8)
        if want == "ringbuf" and not ringbuf_ok:
            raise LoaderError("the BPF ring buffer needs Linux 5.8 or newer: use --buffer perf")
        try:
            self._bpf = self._compile(ringbuf_ok)
        except Exception as e:  # BCC raises bare Exception on compile/attach errors
            if ringbuf_ok and want == "auto" and "ringbuf" in str(e).lower():
                self._bpf = self._compile(False)
                ringbuf_ok = False
            else:
                raise LoaderError(f"cannot load the eBPF programs: {e}") from None
        self.buffer = "ringbuf" if ringbuf_ok else "perf"
        if self.options.deny_exec_names:
            self._load_lsm()
            if self._lsm is None and self.options.probe_mode != "syscalls":
                # no BPF-LSM: the exec probe kills a denied name before its first instruction
                _fill_names(self._bpf[b"kill_exec_names"], self.options.deny_exec_names)
                self.lsm_status = (f"sched_process_exec: SIGKILL before the first instruction "
                                   f"({len(self.options.deny_exec_names)} names; BPF-LSM "
                                   f"{self.lsm_status.removeprefix('unavailable: ')})")
        b = self._bpf
        try:
            self._cg_fns = [(b.load_func(name.encode(), ptype, attach_type=atype), atype)
                            for name, ptype, atype in CGROUP_PROGRAMS if name != "ap_device"]
        except Exception as e:
            raise LoaderError(f"cannot load the cgroup socket programs: {e}") from None
        self._load_device_hook()
        self.paths = describe_paths(self.options, self.gpu, self.device_hook)
        all_majors = with_extra_majors(gpu_majors(), self.options.extra_gpu_majors)
        for major, kind in all_majors.items():
            b[b"gpu_majors"][ct.c_uint32(major)] = ct.c_uint32(kind)
        self.gpu_majors = all_majors
        cb = self._callback
        if ringbuf_ok:
            b[b"events"].open_ring_buffer(cb)
        else:
            b[b"events"].open_perf_buffer(cb, page_cnt=self.options.perf_pages)

    def _load_device_hook(self) -> None:
        """The device hook reports GPU opens; on-demand ioctl tracing depends on it."""
        try:
            fn = self._bpf.load_func(b"ap_device", 15, attach_type=6)
            self._cg_fns.append((fn, 6))
            self.device_hook = "cgroup device hook on the watched cgroups"
        except Exception as e:
            self.device_hook = f"unavailable ({str(e).splitlines()[0] if str(e) else e})"
            if self.gpu.probe == "on-demand":
                why = (self.gpu.why + "; " if self.gpu.why else "") + "no device hook"
                self.gpu = GpuProbeChoice("always", why, self.gpu.ioctl_fn)
                self.gpu_probe = self.gpu.probe
        if self.gpu_probe == "on-demand":
            self.detach_ioctl()
        elif self.gpu_probe == "always":
            self.ioctl_attached = True

    # ---- on-demand ioctl tracing ----
    def attach_ioctl(self) -> bool:
        """Attach sys_enter_ioctl (on-demand mode); True when it was not attached before."""
        if self.ioctl_attached or self.gpu_probe != "on-demand":
            return False
        self._bpf.attach_tracepoint(tp=IOCTL_TRACEPOINT, fn_name=IOCTL_TP_FN)
        self.ioctl_attached = True
        return True

    def detach_ioctl(self) -> bool:
        if self.gpu_probe != "on-demand":
            return False
        try:
            self._bpf.detach_tracepoint(IOCTL_TRACEPOINT)
        except Exception:
            pass  # not attached
        was = self.ioctl_attached
        self.ioctl_attached = False
        return was

    def _callback(self, *args) -> int:
        # ring buffer: (ctx, data, size); perf buffer: (cpu, data, size)
        _, data, size = args
        self.records_read += 1
        self._on_record(ct.string_at(data, size))
        return 0

    def _set_busy(self, on: bool) -> None:
        """Agents busy (or quiet again): with busy polling, the programs stop (or resume) waking us;
        on_busy, when set, hears of it (the watcher leaves SCHED_FIFO while busy)."""
        if self.busy_poll or not on:
            self._bpf[b"watcher_polling"][ct.c_int(0)] = ct.c_uint32(1 if on else 0)
        self._busy = on
        if self.on_busy is not None:
            self.on_busy(on)

    @property
    def busy(self) -> bool:
        return self._busy

    # ---- watched cgroups ----
    def set_watched(self, cgroups: Iterable[WatchedCgroup]) -> None:
        b = self._bpf
        table = b[b"watched"]
        wanted = {c.id: c for c in cgroups}
        for k in list(table.keys()):
            if k.value not in wanted:
                del table[k]
        mask = 0
        for c in wanted.values():
            table[ct.c_uint64(c.id)] = ct.c_uint8(1)
            if c.level < abi.MAX_CGROUP_LEVEL:
                mask |= 1 << c.level
        b[b"watched_levels"][ct.c_int(0)] = ct.c_uint64(mask)
        if self._lsm is not None:
            lt = self._lsm[b"watched"]
            lt.clear()
            for c in wanted.values():
                lt[ct.c_uint64(c.id)] = ct.c_uint8(1)
            self._lsm[b"watched_levels"][ct.c_int(0)] = ct.c_uint64(mask)
        self._attach_cgroups(wanted)

    def _load_lsm(self) -> None:
        """The BPF-LSM exec deny, where the kernel allows it; otherwise say why and go on."""
        try:
            lsm_list = Path("/sys/kernel/security/lsm").read_text().strip().split(",")
        except OSError:
            lsm_list = []
        if "bpf" not in lsm_list:
            self.lsm_status = "unavailable: BPF-LSM is not enabled (boot with lsm=...,bpf)"
            return
        try:
            flags = lsm_cflags(self.offsets, self.options, kernel_at_least(5, 11))
            with _quiet_stderr():
                self._lsm = self.bcc.BPF(text=program_text("lsm.bpf.c").encode(), cflags=flags)
        except Exception as e:
            self._lsm = None
            lockdown = _lockdown()
            why = "EPERM" if "privileges" in str(e) else str(e)
            self.lsm_status = f"unavailable: the kernel refused the LSM program ({why}; kernel lockdown: {lockdown})"
            return
        _fill_names(self._lsm[b"deny_exec_names"], self.options.deny_exec_names)
        self._lsm[b"events"].open_perf_buffer(self._callback, page_cnt=8)
        self.lsm_status = f"bpf-lsm bprm_check_security ({len(self.options.deny_exec_names)} names)"

    # ---- in-kernel deny ----
    def set_deny(self, ports: Iterable[int], allow: Iterable[str], deny: Iterable[str], enabled: bool) -> None:
        """Refuse agent connects to `ports` outside the `allow` networks, and to the `deny`
        networks, in the cgroup connect hooks (EPERM before any packet leaves)."""
        import ipaddress

        b = self._bpf
        b[b"deny_conf"][ct.c_int(0)] = ct.c_uint32(0)  # off while the maps change
        for name in (b"deny_ports", b"allow4", b"allow6", b"deny4", b"deny6"):
            b[name].clear()
        for port in ports:
            b[b"deny_ports"][ct.c_uint16(port)] = ct.c_uint8(1)
        hosts = 0  # the deny tries hold IPv4 / IPv6 entries (deny.bpf.c)
        for spec in deny:
            v4 = ipaddress.ip_network(spec, strict=False).version == 4
            hosts |= abi.DENY_CONF_HOSTS4 if v4 else abi.DENY_CONF_HOSTS6
        for trie4, trie6, nets in ((b"allow4", b"allow6", allow), (b"deny4", b"deny6", deny)):
            for spec in nets:
                net = ipaddress.ip_network(spec, strict=False)
                if net.version == 4:
                    key = abi.LpmV4(net.prefixlen, (ct.c_uint8 * 4)(*net.network_address.packed))
                    b[trie4][key] = ct.c_uint8(1)
                else:
                    key6 = abi.LpmV6(net.prefixlen, (ct.c_uint8 * 16)(*net.network_address.packed))
                    b[trie6][key6] = ct.c_uint8(1)
        # bits 8-31: a new generation, so that no verdict remembered with a destination under the
        # old lists is taken for current (conn_repeats, connect.bpf.c)
        self._deny_gen = (self._deny_gen + 1) & 0xFFFFFF or 1
        conf = (abi.DENY_CONF_ON | hosts if enabled else 0) | self._deny_gen << abi.DENY_CONF_GEN_SHIFT
        b[b"deny_conf"][ct.c_int(0)] = ct.c_uint32(conf)

    def _attach_cgroups(self, wanted: dict[int, WatchedCgroup]) -> None:
        """Attach the socket programs to the top-most watched cgroups (they cover the subtree)."""
        if self.cgroup_root is None:
            return
        paths = {c.path for c in wanted.values()}
        tops = {cid: c for cid, c in wanted.items()
                if not any(c.path != p and c.path.startswith(p.rstrip("/") + "/") for p in paths)}
        for cid in list(self._attached):
            if cid not in tops:
                self._detach(cid)
        for cid, c in tops.items():
            if cid in self._attached:
                continue
            path = str(self.cgroup_root / c.path.lstrip("/"))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # the cgroup went away: the next scan drops it
            detach_stale(path)
            done = []
            try:
                for fn, atype in self._cg_fns:
                    self.bcc.BPF.attach_func(fn, fd, atype, BPF_F_ALLOW_MULTI)
                    done.append((fn, atype))
            except Exception as e:
                for fn, atype in done:
                    self._try_detach(fn, fd, atype)
                os.close(fd)
                raise LoaderError(f"cannot attach to cgroup {path}: {e}") from None
            self._attached[cid] = fd

    def _try_detach(self, fn, fd: int, atype: int) -> None:
        try:
            self.bcc.BPF.detach_func(fn, fd, atype)
        except Exception:
            pass  # cgroup already removed: its attachments went with it

    def _detach(self, cid: int) -> None:
        fd = self._attached.pop(cid)
        for fn, atype in self._cg_fns:
            self._try_detach(fn, fd, atype)
        os.close(fd)

    # ---- polling ----
    def poll(self, timeout_ms: int) -> None:
        """Read what the kernel wrote, waiting up to `timeout_ms` for a wake-up.

        Waking us costs the agent an interrupt for each record (24 µs of an exec here, in a VM).
        So while agents are busy (BUSY_RECORDS within BUSY_WINDOW_S) we read the ring every
        BUSY_POLL_MS on our own and tell the kernel not to wake us (watcher_polling): a record
        then waits at most that long. After BUSY_IDLE_S without records, records wake us again."""
        if self.buffer == "ringbuf":
            seen = self.records_read
            if self._busy and self.busy_poll:
                timeout_ms = min(timeout_ms, self.BUSY_POLL_MS)
            elif time.monotonic() < self._grace_until:
                timeout_ms = min(timeout_ms, 2)
            self._bpf.ring_buffer_poll(timeout_ms)
            # fork and exit records do not wake us (ebpf/common.bpf.h): what the wake-up or the
            # timeout left unread is taken now, so they wait at most one poll timeout
            self._bpf.ring_buffer_consume()
            # busy or quiet is tracked also with busy polling off: the watcher's scheduling follows it
            now = time.monotonic()
            if self.records_read != seen:
                self._last_read = now
                if not self._busy:
                    if now - self._window_start > self.BUSY_WINDOW_S:
                        self._window_start, self._window_records = now, 0
                    self._window_records += self.records_read - seen
                    if self._window_records >= self.BUSY_RECORDS:
                        self._set_busy(True)
            elif self._busy and now - self._last_read > self.BUSY_IDLE_S:
                self._set_busy(False)
                if self.busy_poll:
                    # a record whose program saw the flag still set may land just after this read;
                    # it set quiet_written, so the next record forces a wake-up, and a short wait
                    # bounds it meanwhile
                    self._bpf.ring_buffer_consume()
                    self._grace_until = now + 0.02
        else:
            self._bpf.perf_buffer_poll(timeout_ms)
        if self._lsm is not None:
            self._lsm.perf_buffer_poll(0)

    def lost_counts(self) -> dict[int, int]:
        """Records the kernel could not write, by record type, since load."""
        counts = {}
        for b in (self._bpf, self._lsm):
            if b is None:
                continue
            table = b[b"lost"]
            for t in range(abi.EV_TYPES):
                counts[t] = counts.get(t, 0) + int(table.sum(ct.c_int(t)).value)
        return counts

    def gpu_counts(self) -> list[tuple[abi.GpuKey, int, int, int]]:
        """(key, new ioctls since last call, first_ns, last_ns) for keys that moved."""
        return [(abi.GpuKey(*ident), delta, first, last)
                for ident, delta, first, last in moved_gpu_counts(self._bpf[b"gpu_counts"], self._gpu_last)]

    def conn_counts(self, expire_ns: int) -> list[tuple[abi.ConnKey, int, int, int]]:
        """(key, repeats since last call, first_ns, last_ns) of connects counted in the kernel
        instead of recorded; keys quiet since `expire_ns` (monotonic) are dropped."""
        return [(abi.ConnKey.from_buffer_copy(k), d["count"], v.first_ns, v.last_ns)
                for k, v, d in moved_entries(self._bpf[b"conn_repeats"], ("count",), self._conn_last, expire_ns)]

    def conn_sweeps(self, expire_ns: int) -> list[tuple[int, abi.ConnSweep, int]]:
        """(pid, state, connects counted since the last call) of processes whose connects to new
        destinations went past the record budget; processes quiet since `expire_ns` are dropped."""
        return [(pid, abi.ConnSweep.from_buffer_copy(v), moved)
                for pid, v, moved in moved_sweeps(self._bpf[b"conn_sweeps"], self._sweep_last, expire_ns)]

    def set_recorded_ports(self, ports: Iterable[int]) -> None:
        """Ports whose connects are always recorded, never counted as part of a sweep."""
        t = self._bpf[b"conn_always_ports"]
        t.clear()
        for port in ports:
            t[ct.c_uint16(port)] = ct.c_uint8(1)

    def flow_counts(self, expire_ns: int) -> list[tuple[abi.FlowKey, dict, int, int]]:
        """(key, {packets, bytes, sampled} since last call and max_len, first_ns, last_ns) of the ICMP
        and DNS packets counted in the kernel; keys quiet since `expire_ns` are dropped."""
        return [(abi.FlowKey.from_buffer_copy(k), {**d, "max_len": v.max_len}, v.first_ns, v.last_ns)
                for k, v, d in moved_entries(self._bpf[b"flow_counts"], ("packets", "bytes", "sampled"),
                                             self._flow_last, expire_ns)]

    def remember_agents(self, pids: dict[int, int]) -> int:
        """Processes found running in the watched cgroups (pid -> cgroup id): the kernel learns agent
        processes at fork and exec, so one started before the watcher would leave unseen. An entry the
        kernel already holds is newer and kept. Returns how many were added."""
        table = self._bpf[b"agent_pids"]
        added = 0
        for pid, cid in pids.items():
            key = table.Key(pid)
            if key in table:
                continue
            table[key] = table.Leaf(cid)
            if not os.path.exists(f"/proc/{pid}"):  # exited before the write: its pid may be reused
                table.pop(key, None)
                continue
            added += 1
        return added

    def forget_process(self, pid: int) -> None:
        """Drop in-kernel GPU state of an exited process."""
        table = self._bpf[b"gpu_counts"]
        for k in [k for k in table.keys() if k.pid == pid]:
            try:
                del table[k]
            except KeyError:
                pass
        seen = self._bpf[b"gpu_seen"]
        for k in [k for k in seen.keys() if (k.value >> 32) == pid]:
            try:
                del seen[k]
            except KeyError:
                pass
        for ident in [i for i in self._gpu_last if i[0] == pid]:
            del self._gpu_last[ident]

    def close(self) -> None:
        for cid in list(self._attached):
            self._detach(cid)
        if self._lsm is not None:
            try:
                self._lsm.cleanup()
            finally:
                self._lsm = None
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None


def _fill_names(table, names: Iterable[str]) -> None:
    """Basenames as the kernel maps want them: the first 15 bytes, zero-padded."""
    for name in names:
        raw = name_key(name)
        key = table.Key()
        ct.memmove(ct.addressof(key), raw, len(raw))
        table[key] = ct.c_uint8(1)
