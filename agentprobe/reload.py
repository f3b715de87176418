"""SIGHUP: re-read the configuration and the rule files, and swap the rule engine in place.

The watcher keeps running while the new rules are built; records are never held or dropped.
Counters, sequences in progress and dedup windows of rules whose logic did not change are
carried over (RuleEngine.adopt_state); those of changed or new rules start afresh. A bad
file is reported (a `reload` record with `ok: false` and one line on stderr) and the
running rules stay.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import AgentprobeError


class RuleReloader:
    def __init__(self, watcher, build: Callable[[], tuple], err=None) -> None:
        """`build()` returns (engine, deny policy or None, config path or None)."""
        self.watcher = watcher
        self.build = build
        self.err = err or sys.stderr
        self._asked = False
        self.reloads = 0
        self.failures = 0

    def request(self, *_args) -> None:
        """The SIGHUP handler: only sets a flag; the loop does the work."""
        self._asked = True

    def poll(self) -> bool:
        """Called every loop iteration (Watcher.run's `until`): reload when asked; never stops the loop."""
        if self._asked:
            self._asked = False
            self.reload()
        return False

    def _failed(self, error: str) -> None:
        self.failures += 1
        print(f"agentprobe: reload failed, the running rules stay: {error}", file=self.err, flush=True)
        w = self.watcher
        w.emit(w.meta_record("reload", {"ok": False, "error": error}))

    def reload(self) -> None:
        w = self.watcher
        try:
            engine, deny, path = self.build()
        except AgentprobeError as e:
            self._failed(str(e))
            return
        except Exception as e:  # a reload must never stop the watcher
            self._failed(f"{type(e).__name__}: {e}")
            return
        kept = w.pipeline.replace_rules(engine)
        from .rules import recorded_ports

        try:
            w.update_recorded_ports(recorded_ports(engine.ruleset))
        except Exception as e:
            print(f"agentprobe: reload: could not update the always-recorded ports: {e}", file=self.err, flush=True)
        if deny is not None or w.options.deny:
            try:
                w.update_deny(deny)
            except Exception as e:  # the rules are swapped; say that the kernel lists are not
                print(f"agentprobe: reload: could not update the in-kernel deny lists: {e}", file=self.err, flush=True)
        self.reloads += 1
        rules = len(engine.ruleset.enabled_rules)
        print(f"agentprobe: reloaded {path or 'the rule files'}: {rules} rules, state of {kept} entries kept",
              file=self.err, flush=True)
        w.emit(w.meta_record("reload", {"ok": True, "config": path, "rules": rules, "state_kept": kept}))
