"""Conditions: parse the text once, compile to closures, evaluate per record.

Grammar (Falco's, with typed fields):

    expr   := or
    or     := and ('or' and)*
    and    := not ('and' not)*
    not    := 'not' not | '(' expr ')' | MACRO | FIELD | FIELD OP values | FIELD 'exists'
    values := VALUE | '(' VALUE (',' VALUE)* ')'
    OP     := = == != < <= > >= in intersects contains icontains startswith endswith
              glob pmatch regex

A VALUE is a bare word or a quoted string ('...' or "...", where only a
backslash before the quote character is an escape, so regexes keep their
backslashes). List names always contain an underscore (`ssh_binaries`), and:
- `FIELD OP NAME`, for any OP but = == !=, names a list, which must exist;
- inside `( ... )` a bare NAME that is a defined list is expanded (Falco's way),
  any other word is a literal;
- `FIELD = word` and quoted strings are always literals.
With several values an operator holds when it holds for any of them; on a
`strs` field, when it holds for any element. `!=` is the negation of `=`. A
missing field makes every comparison false.

Parsing checks syntax, field names, operators against field types and literal
values (numbers, addresses, regexes); references to lists and macros are
resolved at compile time, when all files have been merged.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .argspec import OptionSpec
from .fields import BOOL, FIELDS, INT, IP, STR, STRS, EventView, Field

Predicate = Callable[[EventView], bool]

LOGIC = ("and", "or", "not")
WORD_OPS = ("in", "intersects", "contains", "icontains", "startswith", "endswith", "glob", "pmatch",
            "regex", "exists")
SYMBOL_OPS = ("=", "==", "!=", "<", "<=", ">", ">=")
OPS_BY_TYPE = {
    STR: {"=", "==", "!=", "in", "intersects", "contains", "icontains", "startswith", "endswith", "glob",
          "pmatch", "regex", "exists"},
    INT: {"=", "==", "!=", "<", "<=", ">", ">=", "in", "intersects", "exists"},
    IP: {"=", "==", "!=", "in", "intersects", "exists"},
    BOOL: {"=", "==", "!=", "exists"},
}
OPS_BY_TYPE[STRS] = OPS_BY_TYPE[STR]
# fields that exist only on one record type: a comparison on them implies the type
# record types a field prefix can be true for (a superset is safe: it only indexes rules by type)
TYPE_OF_PREFIX = {"exec": ("exec",), "net": ("connect", "packet", "flow_counts"), "gpu": ("gpu",),
                  "fork": ("fork",), "exit": ("exit",), "payload": ("payload",), "move": ("cgroup_move",),
                  "socket": ("socket",), "bind": ("bind", "listen"), "packet": ("packet", "flow_counts"),
                  "flow": ("flow_counts",), "dns": ("packet",), "tunnel": ("tunnel",),
                  "sweep": ("connect_sweep",)}

LIST_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+$")
MACRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FIELD_TOKEN = re.compile(r"^([a-z]+\.[a-z0-9_]+)(?:\[([^\]]*)\])?$")
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<lp>\() | (?P<rp>\)) | (?P<comma>,)
  | (?P<op>==|!=|<=|>=|=|<|>)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
  | (?P<word>[^\s(),=<>!"']+)
""", re.X)
_RANGE = re.compile(r"^(\d+)-(\d+)$")


class ConditionError(ValueError):
    def __init__(self, reason: str, pos: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pos = pos


# ---- AST ----
@dataclass(frozen=True)
class Lit:
    text: str
    quoted: bool = False


@dataclass(frozen=True)
class ListRef:
    name: str
    strict: bool = True  # False inside ( ... ): a literal when no such list exists


Value = Lit | ListRef


@dataclass(frozen=True)
class Cmp:
    field: str
    arg: str | None
    op: str
    values: tuple[Value, ...]
    pos: int


@dataclass(frozen=True)
class MacroRef:
    name: str
    pos: int


@dataclass(frozen=True)
class And:
    items: tuple


@dataclass(frozen=True)
class Or:
    items: tuple


@dataclass(frozen=True)
class Not:
    item: Any


Node = Cmp | MacroRef | And | Or | Not


# ---- tokens ----
@dataclass(frozen=True)
class Token:
    kind: str  # lp rp comma op str word end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "\"'":
                raise ConditionError(f"unterminated string starting at char {pos + 1}", pos)
            raise ConditionError(f"unexpected {ch!r} at char {pos + 1}", pos)
        kind = m.lastgroup
        if kind != "space":
            raw = m.group()
            if kind == "str":
                q = raw[0]
                raw = raw[1:-1].replace("\\" + q, q)
            out.append(Token(kind, raw, pos))
        pos = m.end()
    out.append(Token("end", "", len(text)))
    return out


def _describe(tok: Token) -> str:
    return "end of condition" if tok.kind == "end" else repr(tok.text)


# ---- parser ----
class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokenize(text)
        self.i = 0

    def peek(self) -> Token:
        return self.toks[self.i]

    def next(self) -> Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def is_word(self, *words: str) -> bool:
        t = self.peek()
        return t.kind == "word" and t.text in words

    def parse(self) -> Node:
        node = self.parse_or()
        tok = self.peek()
        if tok.kind != "end":
            raise ConditionError(f"expected 'and', 'or' or end of condition, found {_describe(tok)} "
                                 f"at char {tok.pos + 1}", tok.pos)
        return node

    def parse_or(self) -> Node:
        items = [self.parse_and()]
        while self.is_word("or"):
            self.next()
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def parse_and(self) -> Node:
        items = [self.parse_not()]
        while self.is_word("and"):
            self.next()
            items.append(self.parse_not())
        return items[0] if len(items) == 1 else And(tuple(items))

    def parse_not(self) -> Node:
        if self.is_word("not"):
            self.next()
            return Not(self.parse_not())
        return self.parse_atom()

    def parse_atom(self) -> Node:
        tok = self.next()
        if tok.kind == "lp":
            node = self.parse_or()
            close = self.next()
            if close.kind != "rp":
                raise ConditionError(f"expected ')' to close '(' at char {tok.pos + 1}, found "
                                     f"{_describe(close)}", close.pos)
            return node
        if tok.kind == "word" and tok.text not in LOGIC and tok.text not in WORD_OPS:
            if "." in tok.text:
                return self.parse_comparison(tok)
            if MACRO_NAME.match(tok.text):
                return MacroRef(tok.text, tok.pos)
        raise ConditionError(f"expected a field, a macro or '(', found {_describe(tok)} at char {tok.pos + 1}",
                             tok.pos)

    def parse_comparison(self, tok: Token) -> Node:
        m = FIELD_TOKEN.match(tok.text)
        name, arg = (m.group(1), m.group(2)) if m else (tok.text, None)
        fdef = FIELDS.get(name)
        if fdef is None:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConditionError(f"unknown field '{name}'{hint}", tok.pos)
        if fdef.make is not None and not arg:
            raise ConditionError(f"field '{name}' needs a list argument: {name}[LIST]", tok.pos)
        if fdef.make is None and arg is not None:
            raise ConditionError(f"field '{name}' takes no argument", tok.pos)
        if arg is not None and not LIST_NAME.match(arg):
            raise ConditionError(f"field '{name}': '{arg}' is not a list name", tok.pos)
        op_tok = self.peek()
        is_op = op_tok.kind == "op" or (op_tok.kind == "word" and op_tok.text in WORD_OPS)
        if not is_op:
            if fdef.type == BOOL:
                return Cmp(name, arg, "=", (Lit("true"),), tok.pos)
            raise ConditionError(f"field '{name}' needs an operator, found {_describe(op_tok)}", op_tok.pos)
        self.next()
        op = op_tok.text
        if op not in OPS_BY_TYPE[fdef.type]:
            raise ConditionError(f"operator '{op}' does not apply to {fdef.type} field '{name}'", op_tok.pos)
        if op == "exists":
            return Cmp(name, arg, op, (), tok.pos)
        values = self.parse_values(op)
        if op in ("<", "<=", ">", ">=") and (len(values) != 1 or isinstance(values[0], ListRef)):
            raise ConditionError(f"operator '{op}' takes one number", op_tok.pos)
        for v in values:
            if isinstance(v, Lit):
                try:
                    convert(fdef.type, op, [v.text])
                except ValueError as e:
                    raise ConditionError(str(e), tok.pos) from None
        return Cmp(name, arg, op, tuple(values), tok.pos)

    def parse_values(self, op: str) -> list[Value]:
        tok = self.next()
        if tok.kind in ("word", "str"):
            if op in ("=", "==", "!=") or tok.kind == "str" or not LIST_NAME.match(tok.text):
                return [Lit(tok.text, tok.kind == "str")]
            return [ListRef(tok.text)]
        if tok.kind != "lp":
            raise ConditionError(f"expected a value or '(', found {_describe(tok)}", tok.pos)
        values = []
        while True:
            v = self.next()
            if v.kind not in ("word", "str"):
                raise ConditionError(f"expected a value in list, found {_describe(v)}", v.pos)
            values.append(self.value(v))
            sep = self.next()
            if sep.kind == "rp":
                return values
            if sep.kind != "comma":
                raise ConditionError(f"expected ',' or ')' in list, found {_describe(sep)}", sep.pos)

    @staticmethod
    def value(tok: Token) -> Value:
        if tok.kind == "word" and LIST_NAME.match(tok.text):
            return ListRef(tok.text, strict=False)
        return Lit(tok.text, tok.kind == "str")


def parse(text: str) -> Node:
    """Parse a condition; ConditionError on syntax, field, operator or literal errors."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("empty condition")
    return _Parser(text).parse()


def references(node: Node) -> tuple[set[str], set[str]]:
    """(macros, lists) a condition names."""
    macros: set[str] = set()
    lists: set[str] = set()

    def walk(n: Node) -> None:
        if isinstance(n, MacroRef):
            macros.add(n.name)
        elif isinstance(n, Cmp):
            lists.update(v.name for v in n.values if isinstance(v, ListRef) and v.strict)
            if n.arg:
                lists.add(n.arg)
        elif isinstance(n, Not):
            walk(n.item)
        elif isinstance(n, (And, Or)):
            for i in n.items:
                walk(i)
    walk(node)
    return macros, lists


# ---- values ----
@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad regex {pattern!r}: {e}") from None


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern:
    return re.compile(fnmatch.translate(pattern))


def _pmatch_prefix(path: str) -> str:
    return path if path == "/" else path.rstrip("/")


def convert(ftype: str, op: str, texts: Iterable[str]) -> Any:
    """Typed, precompiled form of the values of one comparison; ValueError when a value does not fit."""
    texts = [str(t) for t in texts]
    if op == "exists":
        return None
    if ftype == INT:
        exact: set[int] = set()
        ranges: list[tuple[int, int]] = []
        for t in texts:
            r = _RANGE.match(t)
            try:
                if r and op in ("=", "==", "!=", "in", "intersects"):
                    lo, hi = int(r.group(1)), int(r.group(2))
                    if lo > hi:
                        raise ValueError
                    ranges.append((lo, hi))
                else:
                    exact.add(int(t, 0))
            except ValueError:
                raise ValueError(f"expected a number or range, got {t!r}") from None
        return frozenset(exact), tuple(ranges)
    if ftype == IP:
        nets = []
        for t in texts:
            try:
                nets.append(ipaddress.ip_network(t, strict=False))
            except ValueError:
                raise ValueError(f"expected an address or CIDR, got {t!r}") from None
        return tuple(nets)
    if ftype == BOOL:
        out = set()
        for t in texts:
            if t.lower() not in ("true", "false"):
                raise ValueError(f"expected true or false, got {t!r}")
            out.add(t.lower() == "true")
        return frozenset(out)
    # STR / STRS
    if op == "regex":
        return tuple(compile_regex(t) for t in texts)
    if op == "glob":
        return tuple(_glob(t) for t in texts)
    if op == "pmatch":
        for t in texts:
            if not t.startswith("/"):
                raise ValueError(f"pmatch takes absolute paths, got {t!r}")
        return tuple(_pmatch_prefix(t) for t in texts)
    if op == "icontains":
        return tuple(t.lower() for t in texts)
    if op in ("contains", "startswith", "endswith"):
        return tuple(texts)
    return frozenset(texts)


def _scalar_test(ftype: str, op: str, conv: Any) -> Callable[[Any], bool]:
    """Test of one non-None value."""
    if ftype == INT:
        if op in ("<", "<=", ">", ">="):
            (n,) = conv[0] or {r[0] for r in conv[1]}
            return {"<": lambda v: v < n, "<=": lambda v: v <= n,
                    ">": lambda v: v > n, ">=": lambda v: v >= n}[op]
        exact, ranges = conv
        if not ranges:
            return exact.__contains__
        return lambda v: v in exact or any(lo <= v <= hi for lo, hi in ranges)
    if ftype == IP:
        nets = conv
        seen: dict = {}  # address -> result: few addresses, many records

        def in_nets(v) -> bool:
            hit = seen.get(v)
            if hit is None:
                if len(seen) > 65536:
                    seen.clear()
                hit = seen[v] = any(v in n for n in nets)
            return hit

        return in_nets
    if ftype == BOOL:
        return lambda v: bool(v) in conv
    if op == "regex":
        rxs = conv
        if len(rxs) == 1:
            search = rxs[0].search
            return lambda v: search(v) is not None
        return lambda v: any(r.search(v) for r in rxs)
    if op == "glob":
        globs = conv
        return lambda v: any(g.match(v) for g in globs)
    if op == "pmatch":
        exact = frozenset(conv)
        prefixes = tuple("/" if p == "/" else p + "/" for p in conv)
        return lambda v: v in exact or v.startswith(prefixes)
    if op == "contains":
        subs = conv
        return lambda v: any(s in v for s in subs)
    if op == "icontains":
        subs = conv
        return lambda v: any(s in v.lower() for s in subs)
    if op == "startswith":
        return lambda v: v.startswith(conv)
    if op == "endswith":
        return lambda v: v.endswith(conv)
    return conv.__contains__


# ---- compiler ----
class Resolver(Protocol):
    def has_list(self, name: str) -> bool: ...

    def list_items(self, name: str) -> tuple[str, ...]: ...

    def macro(self, name: str) -> Predicate: ...

    def option_spec(self, name: str) -> OptionSpec: ...

    def converted(self, name: str, ftype: str, op: str) -> Any: ...


def _getter(fdef: Field, arg: str | None, resolver: Resolver) -> Callable[[EventView], Any]:
    if fdef.make is not None:
        return fdef.make(resolver.option_spec(arg))
    return fdef.get


def compile_node(node: Node, resolver: Resolver) -> Predicate:
    if isinstance(node, MacroRef):
        return resolver.macro(node.name)
    if isinstance(node, Not):
        inner = compile_node(node.item, resolver)
        return lambda ev: not inner(ev)
    if isinstance(node, And):
        parts = tuple(compile_node(i, resolver) for i in node.items)
        if len(parts) == 2:
            a, b = parts
            return lambda ev: a(ev) and b(ev)

        def all_of(ev: EventView) -> bool:
            for p in parts:
                if not p(ev):
                    return False
            return True
        return all_of
    if isinstance(node, Or):
        parts = tuple(compile_node(i, resolver) for i in node.items)
        if len(parts) == 2:
            a, b = parts
            return lambda ev: a(ev) or b(ev)

        def any_of(ev: EventView) -> bool:
            for p in parts:
                if p(ev):
                    return True
            return False
        return any_of
    return _compile_cmp(node, resolver)


def _merge(ftype: str, op: str, parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if ftype == INT:
        return (frozenset().union(*(p[0] for p in parts)), tuple(r for p in parts for r in p[1]))
    if isinstance(parts[0], frozenset):
        return frozenset().union(*parts)
    return tuple(x for p in parts for x in p)


def _compile_cmp(node: Cmp, resolver: Resolver) -> Predicate:
    fdef = FIELDS[node.field]
    get = _getter(fdef, node.arg, resolver)
    ftype, op = fdef.type, node.op
    if op == "exists":
        if ftype == STRS:
            return lambda ev: bool(get(ev))
        return lambda ev: get(ev) is not None
    base_op = "=" if op in ("==", "!=", "in", "intersects") else op
    parts = []
    lits = [v.text for v in node.values if isinstance(v, Lit)]
    refs = []
    for v in node.values:
        if isinstance(v, ListRef):
            if v.strict or resolver.has_list(v.name):
                refs.append(v.name)
            else:
                lits.append(v.name)
    if lits:
        try:
            parts.append(convert(ftype, base_op, lits))
        except ValueError as e:
            raise ConditionError(str(e), node.pos) from None
    for name in refs:
        parts.append(resolver.converted(name, ftype, base_op))
    conv = _merge(ftype, base_op, parts)
    test = _scalar_test(ftype, base_op, conv)
    negate = op == "!="
    if ftype == STRS:
        if negate:
            return lambda ev: not any(test(x) for x in get(ev))
        if base_op == "=":
            members = conv
            return lambda ev: not members.isdisjoint(get(ev))
        return lambda ev: any(test(x) for x in get(ev))
    if negate:
        def ne(ev: EventView) -> bool:
            v = get(ev)
            return v is not None and not test(v)
        return ne
    if ftype in (STR, INT) and base_op == "=" and not (ftype == INT and conv[1]):
        members = conv if ftype == STR else conv[0]
        return lambda ev: get(ev) in members

    def positive(ev: EventView) -> bool:
        v = get(ev)
        return v is not None and test(v)
    return positive


# ---- record types a condition can match ----
def event_types(node: Node, macro_types: Callable[[str], frozenset | None]) -> frozenset | None:
    """Record types the condition can be true for (None: any), for indexing rules by type."""
    if isinstance(node, MacroRef):
        return macro_types(node.name)
    if isinstance(node, Not):
        return None
    if isinstance(node, And):
        known = [t for t in (event_types(i, macro_types) for i in node.items) if t is not None]
        return frozenset.intersection(*known) if known else None
    if isinstance(node, Or):
        out: set = set()
        for i in node.items:
            t = event_types(i, macro_types)
            if t is None:
                return None
            out |= t
        return frozenset(out)
    if node.field == "evt.type" and node.op in ("=", "==", "in", "intersects") \
            and all(isinstance(v, Lit) for v in node.values):
        return frozenset(v.text for v in node.values)
    prefix = node.field.split(".", 1)[0]
    if prefix in TYPE_OF_PREFIX:
        return frozenset(TYPE_OF_PREFIX[prefix])
    return None
