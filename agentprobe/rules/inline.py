"""Code handed to a shell or an interpreter on its command line (`sh -c CODE`, `python -c CODE`,
`perl -e CODE`, `node -e CODE`, an awk program) is text, not the argv of a program that runs: what
that code runs is seen at its own exec, what it connects to at the connect. This module splits an
argv into that inline code and the arguments the program itself takes (a script's path and its
own arguments included), so rules can judge the second and only alert on the first.

The parsers follow each interpreter's own option syntax far enough to find the code; an argv
they do not understand is all arguments (never code), so nothing is hidden by an odd spelling.
"""

from __future__ import annotations

import re

SHELLS = frozenset({"sh", "bash", "rbash", "dash", "zsh", "ksh", "ksh93", "mksh", "ash", "fish", "csh", "tcsh",
                    "yash", "posh"})
AWKS = frozenset({"awk", "gawk", "mawk", "nawk", "busybox-awk"})
_PYTHON = re.compile(r"^(python|pypy)[0-9.]*(-dbg)?$")
_PERL = re.compile(r"^perl[0-9.]*$")
_RUBY = re.compile(r"^ruby[0-9.]*$")
_PHP = re.compile(r"^php[0-9.]*(-cli)?$")
_LUA = re.compile(r"^(lua[0-9.]*|luajit)$")
_NODE = re.compile(r"^(node|nodejs|bun|deno)$")


def basename(arg: str) -> str:
    return arg.rstrip("/").rsplit("/", 1)[-1]


def split_inline_code(argv: list[str] | tuple[str, ...], names: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(inline code, the other arguments) of an argv (argv[0] included in neither). `names` are the
    names the process goes by (comm, exe): an interpreter is known by any of them or argv[0]."""
    if not argv:
        return [], []
    args = list(argv[1:])
    cands = {basename(argv[0]), *names}
    if "busybox" in cands and args and basename(args[0]) in SHELLS | AWKS:  # busybox sh -c ...
        cands.add(basename(args[0]))
        args = args[1:]
    if cands & SHELLS:
        return _shell(args)
    if cands & AWKS:
        return _awk(args)
    for pattern, parse in ((_PYTHON, _python), (_PERL, _perl), (_RUBY, _dash_e), (_NODE, _node),
                           (_PHP, _php), (_LUA, _dash_e)):
        if any(pattern.match(c) for c in cands):
            return parse(args)
    return [], args


def _shell(args: list[str]) -> tuple[list[str], list[str]]:
    """POSIX shells: with -c (alone or in a cluster such as -ec, -lc), the first operand is the code;
    -o/-O/+o/+O and bash's --rcfile/--init-file take a value."""
    i, command = 0, False
    while i < len(args):
        a = args[i]
        if a in ("--", "-"):
            i += 1
            break
        if a in ("--rcfile", "--init-file"):
            i += 2
            continue
        if a.startswith("--"):
            i += 1
            continue
        if len(a) > 1 and a[0] in "-+":
            flags = a[1:]
            if "c" in flags and a[0] == "-":
                command = True
            i += 1 + sum(1 for f in flags if f in "oO")  # each o/O in a cluster takes the next argument
            continue
        break
    if command and i < len(args):
        return [args[i]], args[:i] + args[i + 1:]
    return [], args


def _python(args: list[str]) -> tuple[list[str], list[str]]:
    """python [-bBdEhiIOqsSuvVWx?] [-c CODE | -m MOD | FILE | -] [args]: -W, -X and -Q take values;
    -c ends the options, its value (attached or next) is the code, what follows is sys.argv."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--" or not a.startswith("-") or a == "-":
            break
        if a.startswith("--"):  # --check-hash-based-pycs takes a value
            i += 2 if a == "--check-hash-based-pycs" else 1
            continue
        j = 1
        while j < len(a):
            f = a[j]
            if f == "c":
                code = a[j + 1:] or (args[i + 1] if i + 1 < len(args) else "")
                rest_at = i + 1 if a[j + 1:] else i + 2
                return [code], args[:i] + args[rest_at:]
            if f in "WXQm":
                if f == "m":
                    return [], args
                i += 0 if a[j + 1:] else 1  # value attached, or the next argument
                break
            j += 1
        i += 1
    return [], args


def _perl(args: list[str]) -> tuple[list[str], list[str]]:
    """perl: switches cluster (-ne, -lane); an e or E takes the rest of its cluster, or else the next
    argument, as code (every -e counts); -l and -0 take digits; -i, -I, -M, -m, -x, -d, -D, -C, -F take
    the rest of their cluster as a value, and -I and -M the next argument when the rest is empty; the first operand
    after the switches is the script, unless there was code."""
    code, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == "--" or not a.startswith("-") or a == "-":
            break
        rest.append(a)
        j = 0
        while j + 1 < len(a):
            j += 1
            f = a[j]
            if f in "l0":  # -l[octnum], -0[octal/hex digits]: digits only, the cluster goes on
                while j + 1 < len(a) and a[j + 1] in "0123456789abcdefABCDEFxX":
                    j += 1
                continue
            if f in "eE":
                if a[j + 1:]:
                    code.append(a[j + 1:])
                    rest[-1] = a[:j + 1]  # the switches, without the code attached to them
                elif i + 1 < len(args):
                    code.append(args[i + 1])
                    i += 1
                break
            if f in "iIMmxdDCF":
                if f in "IM" and not a[j + 1:] and i + 1 < len(args):
                    rest.append(args[i + 1])
                    i += 1
                break
        i += 1
    return code, rest + args[i:]


def _code_options(args: list[str], code_flags: tuple[str, ...],
                  value_flags: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Options until the first operand: each flag of `code_flags` takes code (attached, `-eCODE` or
    `--eval=CODE`, or the next argument); each of `value_flags` takes the next argument."""
    code, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == "--" or not a.startswith("-") or a == "-":
            break
        head, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        flag = next((f for f in code_flags if head == f or (not f.startswith("--") and head.startswith(f))), None)
        if flag is not None:
            attached = value if eq else head[len(flag):]
            if attached:
                code.append(attached)
            elif i + 1 < len(args):
                code.append(args[i + 1])
                i += 1
        else:
            rest.append(a)
            if not eq and a in value_flags and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
        i += 1
    return code, rest + args[i:]


def _dash_e(args: list[str]) -> tuple[list[str], list[str]]:
    """ruby, lua: every -e CODE is code."""
    return _code_options(args, ("-e",))


def _node(args: list[str]) -> tuple[list[str], list[str]]:
    """node: -e/--eval and -p/--print CODE are code; -r/--require, --import and --loader take a value."""
    return _code_options(args, ("--eval", "--print", "-e", "-p"),
                         ("-r", "--require", "--import", "--loader", "--experimental-loader"))


def _php(args: list[str]) -> tuple[list[str], list[str]]:
    """php: -r CODE (and -B/-R/-E, per-line code) are code; -d/-c/-z/-F take a value."""
    return _code_options(args, ("-r", "-B", "-R", "-E"), ("-d", "-c", "-z", "-F"))


def _awk(args: list[str]) -> tuple[list[str], list[str]]:
    """awk [-F fs] [-v var=val] [-f progfile | 'program'] [file ...]: without -f, the first operand
    is the program."""
    rest, i, progfile = [], 0, False
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        rest.append(a)
        if a in ("-F", "-v", "-f", "--field-separator", "--assign", "--file") and i + 1 < len(args):
            progfile = progfile or a in ("-f", "--file")
            rest.append(args[i + 1])
            i += 1
        elif a.startswith("-f") or a.startswith("--file="):
            progfile = True
        i += 1
    if not progfile and i < len(args):
        return [args[i]], rest + args[i + 1:]
    return [], rest + args[i:]
