"""Rule files: YAML -> validated lists, macros and rules, merged by name.

A file is a YAML sequence of items, each a mapping with exactly one of `list`,
`macro` or `rule`. Files are merged in order (the shipped default first): a
later list, macro or rule with the same name replaces the earlier one; a list
with `append: true` extends it; a rule item without `condition` or `sequence`
modifies the existing rule (e.g. `enabled: true`, a new `priority`, a
`count.threshold`). Within one file a name may be defined once.

Every error is a RuleError whose message is `FILE:LINE: KIND 'NAME': reason`;
line numbers come from the YAML nodes.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import condition as cond
from .fields import FIELDS, INT
from .model import (
    ACTIONS,
    COUNT_SCOPES,
    PRIORITIES,
    SEQUENCE_SCOPES,
    CountSpec,
    Origin,
    RuleError,
    RuleSpec,
    SequenceSpec,
    error_at,
    one_line,
    parse_duration,
)

DEFAULT_RULES = "default.yaml"
RULE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
OUTPUT_FIELD = re.compile(r"%([a-z]+\.[a-z0-9_]+(?:\[[^\]\s]*\])?)")

LIST_KEYS = {"list", "items", "append", "desc"}
MACRO_KEYS = {"macro", "condition", "desc"}
RULE_KEYS = {"rule", "name", "desc", "condition", "sequence", "count", "output", "priority", "tags",
             "action", "enabled", "dedup"}
COUNT_KEYS = {"by", "within", "threshold", "distinct", "sum"}
SEQUENCE_KEYS = {"by", "within", "order", "steps"}
# Falco's priority names, for rules written for Falco
PRIORITY_ALIASES = {"emergency": "critical", "alert": "critical", "error": "high", "warning": "medium",
                    "notice": "low", "informational": "info", "debug": "info"}


# ---- YAML with line numbers ----
class _Map(dict):
    """A mapping that remembers where it and each of its keys/values are."""

    line: int
    key_lines: dict
    value_lines: dict
    styles: dict


class _Seq(list):
    line: int
    item_lines: list


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    m = _Map()
    m.line = node.start_mark.line + 1
    m.key_lines, m.value_lines, m.styles = {}, {}, {}
    for knode, vnode in node.value:
        key = loader.construct_object(knode, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "unhashable key", knode.start_mark) from None
        if key in m:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", knode.start_mark)
        m[key] = loader.construct_object(vnode, deep=True)
        m.key_lines[key] = knode.start_mark.line + 1
        m.value_lines[key] = vnode.start_mark.line + 1
        m.styles[key] = getattr(vnode, "style", None)
    return m


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    s = _Seq(loader.construct_object(n, deep=True) for n in node.value)
    s.line = node.start_mark.line + 1
    s.item_lines = [n.start_mark.line + 1 for n in node.value]
    return s


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _text_line(m: _Map, key: str, pos: int | None) -> int:
    """Line of character `pos` of the text under `key` (exact for plain lines and `|` blocks)."""
    line = m.value_lines.get(key, m.key_lines.get(key, m.line))
    style = m.styles.get(key)
    text = m.get(key)
    if style in ("|", ">"):
        line += 1
    if pos is not None and isinstance(text, str) and style in ("|", None):
        line += text.count("\n", 0, pos)
    return line


# ---- definitions ----
@dataclass
class ListDef:
    name: str
    items: tuple[str, ...]
    origins: tuple[Origin, ...]
    origin: Origin


@dataclass
class MacroDef:
    name: str
    text: str
    ast: Any
    origin: Origin
    raw: _Map

    def line_of(self, pos: int | None) -> Origin:
        return Origin(self.origin.file, _text_line(self.raw, "condition", pos))


@dataclass
class RuleDef:
    id: str
    raw: dict
    lines: dict  # key -> Origin of the key (of the definition that set it)
    origin: Origin
    maps: dict = field(default_factory=dict)  # key -> the YAML mapping that set it (for text lines)
    spec: RuleSpec | None = None  # None for a modification not yet applied


@dataclass
class Sources:
    """Everything the loaded files define, merged by name."""

    lists: dict[str, ListDef] = field(default_factory=dict)
    macros: dict[str, MacroDef] = field(default_factory=dict)
    rules: dict[str, RuleDef] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class ParsedFile:
    name: str
    lists: list[tuple[ListDef, bool]]  # (definition, append)
    macros: list[MacroDef]
    rules: list[RuleDef]


def read_yaml(text: str, name: str) -> list:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise RuleError(f"{name}:{line}: YAML error: {one_line(e.problem or e)}") from None
    except yaml.YAMLError as e:
        raise RuleError(f"{name}: YAML error: {one_line(e)}") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise RuleError(f"{name}:1: a rule file is a YAML list of list/macro/rule items")
    return data


def parse_file(text: str, name: str) -> ParsedFile:
    """Validate one file on its own: syntax, keys, conditions (references are resolved when merged)."""
    items = read_yaml(text, name)
    out = ParsedFile(name, [], [], [])
    seen: dict[tuple[str, str], int] = {}
    for pos, item in enumerate(items):
        line = items.item_lines[pos] if isinstance(items, _Seq) else 1
        if not isinstance(item, _Map):
            raise RuleError(f"{name}:{line}: expected a mapping with 'list', 'macro' or 'rule'")
        kinds = [k for k in ("list", "macro", "rule") if k in item]
        if len(kinds) != 1:
            raise RuleError(f"{name}:{item.line}: an item has exactly one of 'list', 'macro' or 'rule'")
        kind = kinds[0]
        ident = item[kind]
        if not isinstance(ident, str) or not ident:
            raise RuleError(f"{name}:{item.line}: {kind} name must be a non-empty string")
        origin = Origin(name, item.line)
        if (kind, ident) in seen:
            raise error_at(origin, kind, ident, f"duplicate {kind} {'id' if kind == 'rule' else 'name'} "
                                                f"(first defined at line {seen[(kind, ident)]})")
        seen[(kind, ident)] = item.line
        if kind == "list":
            out.lists.append(_list_def(item, ident, origin))
        elif kind == "macro":
            out.macros.append(_macro_def(item, ident, origin))
        else:
            out.rules.append(_rule_def(item, ident, origin))
    _check_macro_cycles(out.macros)
    return out


def _unknown_keys(item: _Map, allowed: set[str], origin: Origin, kind: str, ident: str) -> None:
    for key in item:
        if key not in allowed:
            raise error_at(Origin(origin.file, item.key_lines[key]), kind, ident,
                           f"unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")


def _key_origin(item: _Map, origin: Origin, key: str) -> Origin:
    return Origin(origin.file, item.key_lines.get(key, item.line))


def _list_def(item: _Map, ident: str, origin: Origin) -> tuple[ListDef, bool]:
    _unknown_keys(item, LIST_KEYS, origin, "list", ident)
    if not cond.LIST_NAME.match(ident):
        raise error_at(origin, "list", ident, "a list name is an identifier with an underscore "
                                             "(e.g. ssh_binaries), so conditions can tell it from a value")
    items = item.get("items")
    if not isinstance(items, list):
        raise error_at(_key_origin(item, origin, "items"), "list", ident, "'items' must be a list")
    append = item.get("append", False)
    if not isinstance(append, bool):
        raise error_at(_key_origin(item, origin, "append"), "list", ident, "'append' must be true or false")
    lines = items.item_lines if isinstance(items, _Seq) else [item.line] * len(items)
    values, origins = [], []
    for value, line in zip(items, lines, strict=True):
        if isinstance(value, (dict, list)) or value is None:
            raise error_at(Origin(origin.file, line), "list", ident, "list items must be strings or numbers")
        values.append(str(value).lower() if isinstance(value, bool) else str(value))
        origins.append(Origin(origin.file, line))
    return ListDef(ident, tuple(values), tuple(origins), origin), append


def _parse_condition(text: Any, item: _Map, key: str, origin: Origin, kind: str, ident: str) -> Any:
    if not isinstance(text, str):
        raise error_at(_key_origin(item, origin, key), kind, ident, f"'{key}' must be a string")
    try:
        return cond.parse(text)
    except cond.ConditionError as e:
        where = Origin(origin.file, _text_line(item, key, e.pos))
        raise error_at(where, kind, ident, e.reason) from None


def _macro_def(item: _Map, ident: str, origin: Origin) -> MacroDef:
    _unknown_keys(item, MACRO_KEYS, origin, "macro", ident)
    if not cond.MACRO_NAME.match(ident):
        raise error_at(origin, "macro", ident, "a macro name is an identifier (letters, digits, _)")
    if "condition" not in item:
        raise error_at(origin, "macro", ident, "missing 'condition'")
    ast = _parse_condition(item["condition"], item, "condition", origin, "macro", ident)
    return MacroDef(ident, item["condition"], ast, origin, item)


def _rule_def(item: _Map, ident: str, origin: Origin) -> RuleDef:
    _unknown_keys(item, RULE_KEYS, origin, "rule", ident)
    if not RULE_ID.match(ident):
        raise error_at(origin, "rule", ident, "a rule id is letters, digits, '_', '.', '-', "
                                             "starting with a letter")
    lines = {k: _key_origin(item, origin, k) for k in item}
    rdef = RuleDef(ident, dict(item), lines, origin, {k: item for k in item})
    if "condition" in item or "sequence" in item:
        rdef.spec = validate_rule(rdef)
    else:
        _validate_modification(rdef)
    return rdef


def _validate_modification(rdef: RuleDef) -> None:
    """A rule item without condition/sequence changes an existing rule: check what it can check alone."""
    if "count" in rdef.raw and not isinstance(rdef.raw["count"], dict):
        raise error_at(rdef.lines["count"], "rule", rdef.id, "'count' must be a mapping")
    _metadata(rdef)


def _metadata(rdef: RuleDef) -> dict:
    """Checked values of the keys every rule shares."""
    raw, ident = rdef.raw, rdef.id

    def fail(key: str, reason: str) -> RuleError:
        return error_at(rdef.lines.get(key, rdef.origin), "rule", ident, reason)

    out: dict = {}
    if "priority" in raw:
        p = raw["priority"]
        p = PRIORITY_ALIASES.get(str(p).lower(), str(p).lower())
        if p not in PRIORITIES:
            raise fail("priority", f"priority must be one of {', '.join(PRIORITIES)}, not {raw['priority']!r}")
        out["priority"] = p
    if "action" in raw:
        if raw["action"] not in ACTIONS:
            raise fail("action", f"action must be one of {', '.join(ACTIONS)}, not {raw['action']!r}")
        out["action"] = raw["action"]
    if "enabled" in raw:
        if not isinstance(raw["enabled"], bool):
            raise fail("enabled", "'enabled' must be true or false")
        out["enabled"] = raw["enabled"]
    if "tags" in raw:
        tags = raw["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, (str, int)) for t in tags):
            raise fail("tags", "'tags' must be a list of strings")
        out["tags"] = tuple(str(t) for t in tags)
    for key in ("desc", "name", "output"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise fail(key, f"'{key}' must be a non-empty string")
            out[key] = one_line(raw[key]) if key != "output" else raw[key].strip()
    if "output" in out:
        for m in OUTPUT_FIELD.finditer(out["output"]):
            token = m.group(1)
            fm = cond.FIELD_TOKEN.match(token)
            name, arg = (fm.group(1), fm.group(2)) if fm else (token, None)
            fdef = FIELDS.get(name)
            if fdef is None:
                raise fail("output", f"unknown field '%{name}' in output")
            if (fdef.make is not None) != (arg is not None):
                raise fail("output", f"field '%{name}' in output: "
                                     f"{'needs [LIST]' if fdef.make else 'takes no argument'}")
    if "dedup" in raw:
        try:
            out["dedup"] = parse_duration(raw["dedup"])
        except ValueError as e:
            raise fail("dedup", str(e)) from None
    return out


def _duration(rdef: RuleDef, block: str, d: dict) -> int:
    if "within" not in d:
        raise error_at(rdef.lines[block], "rule", rdef.id, f"'{block}' needs 'within' (e.g. 60s)")
    try:
        ns = parse_duration(d["within"])
    except ValueError as e:
        raise error_at(rdef.lines[block], "rule", rdef.id, f"{block}.within: {e}") from None
    if ns <= 0:
        raise error_at(rdef.lines[block], "rule", rdef.id, f"{block}.within must be > 0")
    return ns


def _block(rdef: RuleDef, name: str, keys, scopes) -> tuple[dict, Callable[[str], RuleError]]:
    """A rule's `count:` or `sequence:` mapping, its keys and `by` checked; and its error maker."""
    d = rdef.raw[name]
    where = rdef.lines[name]

    def fail(reason: str) -> RuleError:
        return error_at(where, "rule", rdef.id, reason)

    if not isinstance(d, dict):
        raise fail(f"'{name}' must be a mapping")
    for key in d:
        if key not in keys:
            raise fail(f"unknown key '{name}.{key}' (allowed: {', '.join(sorted(keys))})")
    if d.get("by") not in scopes:
        raise fail(f"{name}.by must be one of {', '.join(scopes)}")
    return d, fail


def _count_spec(rdef: RuleDef) -> CountSpec:
    d, fail = _block(rdef, "count", COUNT_KEYS, COUNT_SCOPES)
    threshold = d.get("threshold")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise fail("count.threshold must be a whole number >= 1")
    if "distinct" in d and "sum" in d:
        raise fail("count takes 'distinct' or 'sum', not both")
    for key in ("distinct", "sum"):
        if key in d:
            fdef = FIELDS.get(d[key]) if isinstance(d[key], str) else None
            if fdef is None or fdef.make is not None:
                raise fail(f"count.{key}: unknown field {d[key]!r}")
            if key == "sum" and fdef.type != INT:
                raise fail(f"count.sum needs a number field, '{d[key]}' is {fdef.type}")
    return CountSpec(d["by"], _duration(rdef, "count", d), threshold, d.get("distinct"), d.get("sum"))


def _sequence_spec(rdef: RuleDef) -> SequenceSpec:
    d, fail = _block(rdef, "sequence", SEQUENCE_KEYS, SEQUENCE_SCOPES)
    where = rdef.lines["sequence"]
    order = d.get("order", "strict")
    if order not in ("strict", "any"):
        raise fail("sequence.order must be 'strict' or 'any'")
    steps = d.get("steps")
    if not isinstance(steps, list) or len(steps) < 2:
        raise fail("sequence.steps must be a list of at least two conditions")
    lines = steps.item_lines if isinstance(steps, _Seq) else [where.line] * len(steps)
    for step, line in zip(steps, lines, strict=True):
        if not isinstance(step, str):
            raise error_at(Origin(where.file, line), "rule", rdef.id, "a sequence step is a condition string")
        try:
            cond.parse(step)
        except cond.ConditionError as e:
            raise error_at(Origin(where.file, line), "rule", rdef.id, f"step: {e.reason}") from None
    return SequenceSpec(d["by"], _duration(rdef, "sequence", d), order == "strict", tuple(steps))


def validate_rule(rdef: RuleDef) -> RuleSpec:
    """Check a complete rule definition and build its spec (conditions parsed, not compiled)."""
    raw, ident = rdef.raw, rdef.id
    meta = _metadata(rdef)
    has_cond, has_seq = "condition" in raw, "sequence" in raw
    if has_cond and has_seq:
        raise error_at(rdef.lines["sequence"], "rule", ident, "a rule has 'condition' or 'sequence', not both")
    for key in ("desc", "priority"):
        if key not in meta:
            raise error_at(rdef.origin, "rule", ident, f"missing '{key}'")
    if has_cond:
        _parse_condition(raw["condition"], rdef.maps["condition"], "condition", rdef.lines["condition"],
                         "rule", ident)
    count = _count_spec(rdef) if "count" in raw else None
    if count is not None and not has_cond:
        raise error_at(rdef.lines["count"], "rule", ident, "'count' needs a 'condition'")
    sequence = _sequence_spec(rdef) if has_seq else None
    return RuleSpec(
        id=ident,
        name=meta.get("name", ident),
        desc=meta["desc"],
        priority=meta["priority"],
        action=meta.get("action", "alert"),
        tags=meta.get("tags", ()),
        enabled=meta.get("enabled", True),
        output=meta.get("output"),
        dedup_ns=meta.get("dedup"),
        condition=raw.get("condition"),
        count=count,
        sequence=sequence,
        origin=rdef.origin,
        lines={k: o.line for k, o in rdef.lines.items()},
    )


def _check_macro_cycles(macros: list[MacroDef]) -> None:
    """Cycles among the macros of one file (the merged set is checked when compiled)."""
    graph = {m.name: cond.references(m.ast)[0] for m in macros}
    by_name = {m.name: m for m in macros}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for ref in sorted(graph.get(name, ())):
            if ref not in graph:
                continue
            if state.get(ref) == 1:
                cycle = path[path.index(ref):] + [ref] if ref in path else [name, ref]
                m = by_name[ref]
                raise error_at(m.origin, "macro", ref, f"macro cycle: {' -> '.join(cycle)}")
            if ref not in state:
                visit(ref, path + [ref])
        state[name] = 2

    for m in macros:
        if m.name not in state:
            visit(m.name, [m.name])


# ---- merging ----
def merge(sources: Sources, parsed: ParsedFile) -> None:
    """Add one file's definitions over what is already there."""
    sources.files.append(parsed.name)
    for ldef, append in parsed.lists:
        if append:
            base = sources.lists.get(ldef.name)
            if base is None:
                raise error_at(ldef.origin, "list", ldef.name, "append to a list that is not defined")
            sources.lists[ldef.name] = ListDef(ldef.name, base.items + ldef.items, base.origins + ldef.origins,
                                               base.origin)
        else:
            sources.lists[ldef.name] = ldef
    for mdef in parsed.macros:
        sources.macros[mdef.name] = mdef
    for rdef in parsed.rules:
        if rdef.spec is not None:
            sources.rules[rdef.id] = rdef
            continue
        base = sources.rules.get(rdef.id)
        if base is None:
            raise error_at(rdef.origin, "rule", rdef.id, "no such rule to modify (a rule item without "
                                                         "'condition' or 'sequence' changes an existing rule)")
        raw = dict(base.raw)
        lines = dict(base.lines)
        maps = dict(base.maps)
        for key, value in rdef.raw.items():
            if key == "rule":
                continue
            if key == "count":
                if "count" not in raw:
                    raise error_at(rdef.lines[key], "rule", rdef.id, "the rule has no 'count' to change")
                value = {**raw["count"], **value}
            raw[key] = value
            lines[key] = rdef.lines[key]
            maps[key] = rdef.maps[key]
        merged = RuleDef(rdef.id, raw, lines, base.origin, maps)
        merged.spec = validate_rule(merged)
        sources.rules[rdef.id] = merged


def default_rules_text() -> tuple[str, str]:
    """(text, display name) of the shipped default rule set (package data)."""
    res = importlib.resources.files("agentprobe.rules").joinpath(DEFAULT_RULES)
    return res.read_text(encoding="utf-8"), str(res)


def read_rule_file(path: str | Path) -> tuple[str, str]:
    name = str(path)
    try:
        return Path(path).read_text(encoding="utf-8"), name
    except UnicodeDecodeError as e:
        raise RuleError(f"{name}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise RuleError(f"{name}: cannot read: {e.strerror or e}") from None


def load_sources(paths: Iterable[str | Path] = (), *, defaults: bool = True,
                 extra_lists: Mapping[str, Iterable[object]] | None = None) -> Sources:
    sources = Sources()
    if defaults:
        text, name = default_rules_text()
        merge(sources, parse_file(text, name))
    for path in paths:
        text, name = read_rule_file(path)
        merge(sources, parse_file(text, name))
    for lname, values in (extra_lists or {}).items():
        add_list_items(sources, lname, values)
    return sources


def add_list_items(sources: Sources, name: str, values: Iterable[object]) -> None:
    """Append values known only at run time (hashes of local binaries, ...) to a defined list."""
    base = sources.lists.get(name)
    if base is None:
        raise RuleError(f"list '{name}' (given by the program) is not defined in any rule file")
    add = tuple(str(v) for v in values)
    origin = Origin("<program>", 0)
    sources.lists[name] = ListDef(name, base.items + add, base.origins + (origin,) * len(add), base.origin)
