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
    def __init__(self, watcher, build: Callable[[], tuple], wrap: Callable | None = None, err=None) -> None:
        """`build()` returns (engine, deny policy or None, config path or None); `wrap` wraps the
        new engine as the stage (the metrics timer)."""
        self.watcher = watcher
        self.build = build
        self.wrap = wrap
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

    def _rule_stage_index(self) -> int | None:
        for i, st in enumerate(self.watcher.stages):
            if hasattr(st, "adopt_state") or hasattr(getattr(st, "stage", None), "adopt_state"):
                return i
        return None

    def reload(self) -> None:
        w = self.watcher
        try:
            engine, deny, path = self.build()
        except AgentprobeError as e:
            self.failures += 1
            print(f"agentprobe: reload failed, the running rules stay: {e}", file=self.err, flush=True)
            w.emit(w.meta_record("reload", {"ok": False, "error": str(e)}))
            return
        except Exception as e:  # a reload must never stop the watcher
            self.failures += 1
            print(f"agentprobe: reload failed, the running rules stay: {type(e).__name__}: {e}",
                  file=self.err, flush=True)
            w.emit(w.meta_record("reload", {"ok": False, "error": f"{type(e).__name__}: {e}"}))
            return
        i = self._rule_stage_index()
        kept = 0
        if i is not None:
            old = w.stages[i]
            old_engine = getattr(old, "stage", old)
            kept = engine.adopt_state(old_engine)
            w.stages[i] = self.wrap(engine) if self.wrap else engine
        else:
            w.stages.insert(0, self.wrap(engine) if self.wrap else engine)
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
