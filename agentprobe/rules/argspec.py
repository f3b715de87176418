"""getopt-style parsing of a command line against an option spec kept in a list.

A site describes how a program parses its options in a rule-file list, and
rules ask what options the command line really carries (`proc.opts[LIST]`),
their values (`proc.optargs[LIST]`) and the remaining operands
(`proc.operands[LIST]`). Letters that are an option's *argument* are then never
mistaken for options: `ssh -p R host` has no `-R`, `ssh -NfR 9000:h:22 host` has.

List items (any order):
- a short-option string in getopt(3) syntax, e.g. "46AaCfB:b:c:" (a letter
  followed by ':' takes an argument, '::' an optional attached one); a leading
  '+' stops option parsing at the first operand (POSIX), otherwise options are
  recognised anywhere (GNU permutation);
- "--name" (a long flag), "--name=" (a long option taking an argument);
  unambiguous prefixes are accepted, as getopt_long does;
- "stop_at_operand=N": option parsing ends at the N-th operand (OpenSSH
  parses options before and after the host, but not in the remote command:
  stop_at_operand=2).

Unknown options are taken as flags: for detection, reading too many options is
safer than swallowing the next word as an argument.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_KEYS = itertools.count(1)


@dataclass(frozen=True)
class OptionSpec:
    short_flags: frozenset[str] = frozenset()
    short_args: frozenset[str] = frozenset()
    short_optional: frozenset[str] = frozenset()
    long_flags: frozenset[str] = frozenset()
    long_args: frozenset[str] = frozenset()
    stop_at_operand: int | None = None
    key: int = field(default_factory=lambda: next(_KEYS), compare=False)


@dataclass(frozen=True)
class ParsedArgs:
    opts: tuple[str, ...]      # "-R", "--exec", in command-line order
    optargs: tuple[str, ...]   # "-R=8080:localhost:22", "-o=RemoteForward 9000 h:22"
    operands: tuple[str, ...]


def parse_spec(items: list[str] | tuple[str, ...]) -> OptionSpec:
    """Build an OptionSpec from list items; ValueError on a malformed item."""
    flags: set[str] = set()
    args: set[str] = set()
    optional: set[str] = set()
    long_flags: set[str] = set()
    long_args: set[str] = set()
    stop: int | None = None
    for item in items:
        item = str(item)
        if item.startswith("stop_at_operand="):
            value = item.partition("=")[2]
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"bad option spec item {item!r}: stop_at_operand needs a number >= 1")
            stop = int(value)
        elif item.startswith("--"):
            name = item[2:]
            takes_arg = name.endswith("=")
            name = name.rstrip("=")
            if not name or any(c.isspace() or c == "=" for c in name):
                raise ValueError(f"bad long option {item!r}")
            (long_args if takes_arg else long_flags).add("--" + name)
        else:
            s = item
            if s.startswith("+"):
                stop = stop or 1
                s = s[1:]
            i = 0
            while i < len(s):
                c = s[i]
                if not (c.isalnum() or c in "?#@"):
                    raise ValueError(f"bad short option string {item!r}: {c!r} at {i}")
                if s[i + 1:i + 3] == "::":
                    optional.add("-" + c)
                    i += 3
                elif s[i + 1:i + 2] == ":":
                    args.add("-" + c)
                    i += 2
                else:
                    flags.add("-" + c)
                    i += 1
    return OptionSpec(frozenset(flags), frozenset(args), frozenset(optional), frozenset(long_flags),
                      frozenset(long_args), stop)


def _long_name(spec: OptionSpec, name: str) -> str:
    """Exact long option, or the only one `name` abbreviates, else `name` itself."""
    if name in spec.long_flags or name in spec.long_args:
        return name
    matches = [n for n in itertools.chain(spec.long_flags, spec.long_args) if n.startswith(name)]
    return matches[0] if len(matches) == 1 else name


def parse_args(spec: OptionSpec, args: tuple[str, ...] | list[str]) -> ParsedArgs:
    """Split args (argv without argv[0]) into options, option values and operands."""
    opts: list[str] = []
    optargs: list[str] = []
    operands: list[str] = []
    n = len(args)
    i = 0
    done = False
    while i < n:
        a = args[i]
        i += 1
        if done or a == "-" or not a.startswith("-"):
            operands.append(a)
            if not done and spec.stop_at_operand is not None and len(operands) >= spec.stop_at_operand:
                done = True
            continue
        if a == "--":
            done = True
            continue
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            name = _long_name(spec, name)
            opts.append(name)
            if eq:
                optargs.append(f"{name}={value}")
            elif name in spec.long_args and i < n:
                optargs.append(f"{name}={args[i]}")
                i += 1
            continue
        j = 1
        while j < len(a):
            opt = "-" + a[j]
            opts.append(opt)
            rest = a[j + 1:]
            if opt in spec.short_args:
                if rest:
                    optargs.append(f"{opt}={rest}")
                elif i < n:
                    optargs.append(f"{opt}={args[i]}")
                    i += 1
                break
            if opt in spec.short_optional:
                if rest:
                    optargs.append(f"{opt}={rest}")
                break
            j += 1
    return ParsedArgs(tuple(opts), tuple(optargs), tuple(operands))
