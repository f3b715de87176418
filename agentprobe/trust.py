"""Files the watcher acts on as root (rules, configuration) must not be changeable by other users:
a local user who could edit the rules could switch detection off."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import AgentprobeError


class UntrustedFile(AgentprobeError):
    pass


def untrusted_reason(path: str | os.PathLike) -> str | None:
    """Why a user other than root could change this file (it, or a directory above it), or None.
    The directories the path names on the way count too, not only those of the file a symlink
    leads to: whoever owns one of them can point the link elsewhere between the check and the read."""
    named = Path(os.path.abspath(path))
    p = named.resolve()
    for f in (p, *p.parents, *(d for d in named.parents if d not in p.parents)):
        try:
            st = os.stat(f)
        except OSError:
            return None  # a missing file is reported by whoever reads it
        if st.st_uid != 0:
            return f"{f} is owned by uid {st.st_uid}"
        if f == p and st.st_mode & 0o022:
            return f"{f} is writable by {'group and others' if st.st_mode & 0o002 else 'its group'}"
        if f != p and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"directory {f} is writable by others (and not sticky)"
    return None


def check_trusted(paths, what: str, insist: bool, warn) -> None:
    """Refuse (or, with insist, warn about) files other users could change, when running as root."""
    if os.geteuid() != 0:
        return
    for path in paths:
        why = untrusted_reason(path)
        if why is None:
            continue
        if not insist:
            raise UntrustedFile(f"{what} {path}: {why}; another user could change what agentprobe does "
                                "(chown root, chmod go-w; or --insecure-files to use it anyway)")
        warn(f"agentprobe: warning: {what} {path}: {why} (used anyway: --insecure-files)")
