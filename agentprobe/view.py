"""One line per record for terminals, in the spirit of execsnoop/tcpconnect.

Everything that comes from a watched process (names, argv, paths) is passed
through `clean()` so control characters and escape sequences cannot reach
the terminal.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex

HEADER = f"{'TIME':<12} {'TYPE':<8} {'PID':>7} {'PPID':>7} {'COMM':<16} DETAIL"

# control characters, bidi overrides, and surrogates (file-system bytes that are not UTF-8, which no
# terminal encoding takes)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escaped(m: re.Match) -> str:
    o = ord(m.group())
    return f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else f"\\x{o:02x}"  # \udcff: the byte 0xff


def clean(text: object, limit: int = 400) -> str:
    s = str(text)
    s = _UNPRINTABLE.sub(_escaped, s)
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    return s


def _time(ts: int | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts / 1e9).strftime("%H:%M:%S.%f")[:12]


def _gpu_name(rec: dict) -> str:
    try:
        from .nvidia import decode  # noqa: PLC0415 - optional until the rules land
        d = decode(rec.get("device", {}).get("kind", "nvidia"), rec.get("nr", 0), rec.get("detail", 0))
        name = d.get("name") or hex(rec.get("nr", 0))
        cls = d.get("class")
        return f"{name}({cls})" if cls else name
    except Exception:
        return f"nr={rec.get('nr', 0):#x}"


def detail(rec: dict) -> str:
    t = rec.get("type")
    if t == "exec":
        argv = " ".join(shlex.quote(a) for a in rec.get("argv") or []) or rec.get("filename", "")
        out = clean(argv)
        if rec.get("truncated", {}).get("args"):
            out += f" ...[{rec.get('argc')} args]"
        if rec.get("failed"):
            out += f"  [failed: {rec.get('error', rec.get('retval'))}]"
        return out
    if t == "connect":
        fam = rec.get("family")
        kind = {"stream": "tcp", "dgram": "udp"}.get(rec.get("sock_type"), rec.get("sock_type", "?"))
        if fam in ("inet", "inet6"):
            addr = rec.get("address")
            v6 = fam == "inet6" and not rec.get("v4mapped")
            dest = f"[{addr}]:{rec.get('port')}" if v6 else f"{addr}:{rec.get('port')}"
            if rec.get("v4mapped"):
                dest += " (v4-mapped)"
        elif fam == "unix":
            kind = "unix"
            dest = clean(rec.get("path"))
        else:
            dest = f"family={rec.get('family_num')}"
        res = rec.get("result")
        if res == "error":
            res = rec.get("error", "error")
        return f"{kind} {dest} {res}"
    if t == "gpu":
        dev = rec.get("device", {})
        where = f"{dev.get('kind')} {dev.get('major')}:{dev.get('minor')}"
        if rec.get("kind") == "counts":
            return f"{where} {rec.get('total')} ioctls in {rec.get('interval_ns', 0) / 1e9:.1f}s"
        if rec.get("kind") == "open":
            return f"{where} opened ({'+'.join(rec.get('access') or [])})"
        first = " first use of device" if rec.get("first_device") else ""
        return f"{where} {_gpu_name(rec)}{first}"
    if t == "payload":
        fam6 = rec.get("family") == "inet6"
        dest = f"[{rec.get('address')}]:{rec.get('port')}" if fam6 else f"{rec.get('address')}:{rec.get('port')}"
        app = rec.get("app") or "?"
        return clean(f"{rec.get('transport')} {dest} {app} {rec.get('len')}B \"{rec.get('text', '')[:48]}\"")
    if t == "fork":
        return f"child {rec.get('child_pid')}"
    if t == "exit":
        return f"signal {rec['signal']}" if "signal" in rec else f"code {rec.get('code')}"
    if t == "lost":
        counts = " ".join(f"{k}={v}" for k, v in sorted(rec.get("counts", {}).items()))
        return f"{rec.get('total')} records lost ({rec.get('source')}): {counts}"
    if t == "alert":
        return clean(f"[{rec.get('priority')}] {rec.get('rule')}: {rec.get('summary')} -> {rec.get('action')}")
    if t == "response":
        lat = rec.get("latency_ms")
        lat_s = f" in {lat:.1f} ms" if isinstance(lat, (int, float)) else ""
        return clean(f"{rec.get('action')} {rec.get('cgroup', {}).get('path')} {rec.get('outcome')}{lat_s}"
                     f" (rule {rec.get('rule')})")
    if t == "start":
        cgs = ", ".join(c.get("path", "?") for c in rec.get("cgroups", []))
        return clean(f"agentprobe {rec.get('version')} watching {cgs or '(none yet)'} ({rec.get('buffer')})")
    if t == "stop":
        return f"stopped: {rec.get('events_total')} events, {rec.get('lost_total')} lost"
    if t == "connect_counts":
        fam6 = rec.get("family") == "inet6"
        dest = f"[{rec.get('address')}]:{rec.get('port')}" if fam6 else f"{rec.get('address')}:{rec.get('port')}"
        refused = " refused" if rec.get("refused") else ""
        what = "UDP sends" if rec.get("sendmsg") else "connects"
        return f"{dest} {rec.get('count')} more {what}{refused} in {rec.get('interval_ns', 0) / 1e9:.1f}s"
    if t == "connect_sweep":
        return (f"{rec.get('count')} more connects to new destinations (ports {rec.get('min_port')}-"
                f"{rec.get('max_port')}, last {rec.get('address')}:{rec.get('port')}), past "
                f"{rec.get('budget_per_s')}/s recorded")
    if t == "verdict":
        state = "frozen" if rec.get("frozen") else ("clean" if rec.get("clean") else "alerted")
        return clean(f"{(rec.get('cgroup') or {}).get('path')} {state}: {rec.get('alerts')} alerts "
                     f"{sorted((rec.get('rules') or {}).items())} ({rec.get('reason')})")
    if t == "probe":
        return clean(f"{rec.get('probe')} probe {rec.get('change')}")
    if t == "cgroup":
        return clean(f"{rec.get('change')} {rec.get('cgroup', {}).get('path')}")
    return clean(str({k: v for k, v in rec.items() if k not in ("v", "node")}))


VERDICT_HEADER = f"{'EPISODE':<32} {'VERDICT':<10} {'ALERTS':>6} {'FIRST RULE':<36} LABELS"


def verdict_line(rec: dict) -> str:
    """One line per episode verdict: for `agentprobe read --verdicts`."""
    state = "frozen" if rec.get("frozen") else ("clean" if rec.get("clean") else "alerted")
    first = (rec.get("first_alert") or {}).get("rule") or "-"
    labels = " ".join(f"{k}={v}" for k, v in sorted((rec.get("labels") or {}).items()))
    return clean(f"{(rec.get('cgroup') or {}).get('path') or '?':<32} {state:<10} {rec.get('alerts', 0):>6} "
                 f"{first:<36} {labels}", 400)


def line(rec: dict) -> str:
    proc = rec.get("proc") or {}
    ts = rec.get("ts")
    return (
        f"{_time(ts if isinstance(ts, int) else None):<12} {clean(str(rec.get('type', '?')).upper(), 24):<8} "
        f"{clean(proc.get('pid', '-'), 10):>7} {clean(proc.get('ppid', '-'), 10):>7} "
        f"{clean(proc.get('comm', '-'), 16):<16} {detail(rec)}"
    )
