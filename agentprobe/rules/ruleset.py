"""Merged rule sources -> a RuleSet of compiled rules (conditions as closures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import condition as cond
from .alert import OutputTemplate
from .argspec import OptionSpec, parse_spec
from .fields import FIELDS, EventView
from .loader import ListDef, MacroDef, Sources
from .model import Origin, RuleError, RuleInfo, RuleSpec, error_at


@dataclass(eq=False)
class Rule:
    """A compiled rule. `match` (match/count rules) or `steps` (sequences) test one record."""

    spec: RuleSpec
    index: int
    match: cond.Predicate | None
    types: frozenset | None  # record types the rule can fire on; None: any
    steps: tuple[cond.Predicate, ...]
    step_types: tuple[frozenset | None, ...]
    output: OutputTemplate
    value: Callable[[EventView], Any] | None  # count.distinct / count.sum field

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def enabled(self) -> bool:
        return self.spec.enabled

    def info(self) -> RuleInfo:
        return self.spec.info()


class RuleSet:
    """Compiled rules (enabled or not) and the lists they were compiled with."""

    def __init__(self, rules: tuple[Rule, ...], lists: dict[str, tuple[str, ...]], files: tuple[str, ...]) -> None:
        self.rules = rules
        self.lists = lists
        self.files = files
        self._by_id = {r.id: r for r in rules}

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, rule_id: str) -> Rule:
        return self._by_id[rule_id]

    @property
    def enabled_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.enabled)

    def describe(self) -> list[RuleInfo]:
        return [r.info() for r in self.rules]


class _Compiler:
    """Resolves lists and macros for the condition compiler; attributes errors to their item."""

    def __init__(self, sources: Sources) -> None:
        self.lists = sources.lists
        self.macros = sources.macros
        self._macro_preds: dict[str, cond.Predicate] = {}
        self._macro_types: dict[str, frozenset | None] = {}
        self._stack: list[str] = []
        self._expanded: dict[str, tuple[str, ...]] = {}
        self._converted: dict[tuple, Any] = {}
        self._specs: dict[str, OptionSpec] = {}

    # -- lists --
    def _list(self, name: str) -> ListDef:
        ldef = self.lists.get(name)
        if ldef is None:
            raise cond.ConditionError(f"unknown list '{name}'")
        return ldef

    def has_list(self, name: str) -> bool:
        return name in self.lists

    def list_items(self, name: str, _path: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Items of a list with the lists it names expanded."""
        if name in self._expanded:
            return self._expanded[name]
        ldef = self._list(name)
        if name in _path:
            raise error_at(ldef.origin, "list", name, f"list cycle: {' -> '.join(_path + (name,))}")
        out: list[str] = []
        for item in ldef.items:
            if cond.LIST_NAME.match(item) and item in self.lists:
                out.extend(self.list_items(item, _path + (name,)))
            else:
                out.append(item)
        self._expanded[name] = tuple(out)
        return self._expanded[name]

    def _origin_of_item(self, name: str, bad: str) -> Origin:
        ldef = self.lists[name]
        for item, origin in zip(ldef.items, ldef.origins, strict=True):
            if item == bad:
                return origin
            if cond.LIST_NAME.match(item) and item in self.lists and bad in self.list_items(item):
                return self._origin_of_item(item, bad)
        return ldef.origin

    def converted(self, name: str, ftype: str, op: str) -> Any:
        key = (name, ftype, op)
        if key not in self._converted:
            items = self.list_items(name)
            try:
                self._converted[key] = cond.convert(ftype, op, items)
            except ValueError:
                for item in items:
                    try:
                        cond.convert(ftype, op, [item])
                    except ValueError as e:
                        origin = self._origin_of_item(name, item)
                        owner = next((n for n, d in self.lists.items() if origin in d.origins), name)
                        raise error_at(origin, "list", owner, str(e)) from None
                raise
        return self._converted[key]

    def option_spec(self, name: str) -> OptionSpec:
        if name not in self._specs:
            items = self.list_items(name)
            try:
                self._specs[name] = parse_spec(items)
            except ValueError as e:
                raise error_at(self._list(name).origin, "list", name, str(e)) from None
        return self._specs[name]

    # -- macros --
    def macro(self, name: str) -> cond.Predicate:
        pred = self._macro_preds.get(name)
        if pred is not None:
            return pred
        mdef = self.macros.get(name)
        if mdef is None:
            raise cond.ConditionError(f"unknown macro '{name}'")
        if name in self._stack:
            cycle = self._stack[self._stack.index(name):] + [name]
            raise error_at(mdef.origin, "macro", name, f"macro cycle: {' -> '.join(cycle)}")
        self._stack.append(name)
        try:
            pred = self._compile(mdef.ast, mdef, "macro", name)
        finally:
            self._stack.pop()
        self._macro_preds[name] = pred
        return pred

    def macro_types(self, name: str) -> frozenset | None:
        if name not in self._macro_types:
            self._macro_types[name] = cond.event_types(self.macros[name].ast, self.macro_types)
        return self._macro_types[name]

    def _compile(self, ast: Any, where: MacroDef | Origin, kind: str, name: str) -> cond.Predicate:
        try:
            return cond.compile_node(ast, self)
        except cond.ConditionError as e:
            origin = where.line_of(e.pos) if isinstance(where, MacroDef) else where
            raise error_at(origin, kind, name, e.reason) from None

    # -- rules --
    def rule(self, spec: RuleSpec, index: int) -> Rule:
        def origin_of(key: str) -> Origin:
            return Origin(spec.origin.file, spec.lines.get(key, spec.origin.line))

        match = None
        types = None
        steps: list[cond.Predicate] = []
        step_types: list[frozenset | None] = []
        if spec.condition is not None:
            ast = cond.parse(spec.condition)
            match = self._compile(ast, origin_of("condition"), "rule", spec.id)
            types = cond.event_types(ast, self.macro_types)
        if spec.sequence is not None:
            for step in spec.sequence.steps:
                ast = cond.parse(step)
                steps.append(self._compile(ast, origin_of("sequence"), "rule", spec.id))
                step_types.append(cond.event_types(ast, self.macro_types))
            types = None if any(t is None for t in step_types) else frozenset().union(*step_types)
        try:
            output = OutputTemplate(spec.output, spec.name, self)
        except cond.ConditionError as e:
            raise error_at(origin_of("output"), "rule", spec.id, e.reason) from None
        value = None
        if spec.count is not None:
            fname = spec.count.distinct or spec.count.sum
            if fname:
                value = FIELDS[fname].get
        return Rule(spec, index, match, types, tuple(steps), tuple(step_types), output, value)


def compile_sources(sources: Sources) -> RuleSet:
    """Compile every macro and rule (disabled rules too, so mistakes show up before they are enabled)."""
    c = _Compiler(sources)
    for name in sources.macros:
        c.macro(name)
    rules = tuple(c.rule(rdef.spec, i) for i, rdef in enumerate(sources.rules.values()))
    for name in sources.lists:
        c.list_items(name)
    return RuleSet(rules, {n: c.list_items(n) for n in sources.lists}, tuple(sources.files))


__all__ = ["Rule", "RuleSet", "RuleError", "compile_sources"]
