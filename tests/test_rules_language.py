"""The rule language: conditions, fields, getopt specs, files, merging and errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from rule_samples import Proc, connect_record, exec_record, exit_record, gpu_counts, gpu_first_use

from agentprobe.errors import AgentprobeError
from agentprobe.rules import RuleError, check_file, list_rules, load_ruleset
from agentprobe.rules.argspec import parse_args, parse_spec
from agentprobe.rules.condition import ConditionError, parse
from agentprobe.rules.fields import EventView

LISTS = """
- list: shell_binaries
  items: [sh, bash]
- list: more_shells
  items: [shell_binaries, zsh]
- list: tmp_dirs
  items: [/tmp, /dev/shm/]
- list: good_nets
  items: [127.0.0.0/8, "::1", 10.1.2.3]
- list: some_ports
  items: [22, 5900-5903]
- list: evil_patterns
  items: ['^--donate', 'stratum\\+tcp://']
- list: ssh_getopt
  items: ["1246AaCfGgKkMNnqsTtVvXxYyB:b:c:D:E:e:F:I:i:J:L:l:m:O:o:P:p:Q:R:S:W:w:", "stop_at_operand=2"]
- list: name_globs
  items: ["python3*", torchrun]
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def rule_yaml(condition: str, rule_id: str = "r") -> str:
    return f"""
- rule: {rule_id}
  desc: test rule
  condition: {json.dumps(condition)}
  priority: high
"""


def matcher(tmp_path: Path, condition: str):
    path = write(tmp_path, LISTS + rule_yaml(condition))
    rule = load_ruleset([path], defaults=False).get("r")
    return lambda rec: rule.match(EventView(rec))


BASH = Proc(pid=100, exe="/usr/bin/bash")
SSH = BASH.child(200, "/usr/bin/ssh")


def ssh_exec(*args: str) -> dict:
    return exec_record(SSH, ["ssh", *args])


# ------------------------------------------------------------------ conditions
@pytest.mark.parametrize("condition, expected", [
    ("proc.name = ssh", True),
    ("proc.name == ssh", True),
    ("proc.name != ssh", False),
    ("proc.name = bash", False),
    ("proc.name in (bash, ssh)", True),
    ("proc.exe startswith /usr/", True),
    ("proc.exe endswith (/scp, /ssh)", True),
    ("proc.exe contains bin/ss", True),
    ("proc.exe icontains BIN/SSH", True),
    ("proc.exe contains BIN", False),
    ("proc.exe glob '/usr/*/ss?'", True),
    ("proc.exe pmatch /usr/bin", True),
    ("proc.exe pmatch /usr/bi", False),
    ("proc.exe regex '^/usr/(s?bin)/ssh$'", True),
    ("proc.exe regex 'ssh\\b'", True),
    ("proc.pid = 200", True),
    ("proc.pid in (1, 2, 150-250)", True),
    ("proc.pid > 199 and proc.pid < 201 and proc.pid >= 200 and proc.pid <= 200", True),
    ("proc.pid = 0xc8", True),
    ("proc.sha256 exists", False),
    ("not proc.sha256 exists", True),
    ("proc.exe exists", True),
    ("proc.args intersects (-R, -L)", True),
    ("proc.args = -R", True),
    ("proc.args != -R", False),
    ("proc.args contains 9000:", True),
    ("proc.args startswith 9000", True),
    ("proc.args regex '^host$'", True),
    ("proc.argv = ssh", True),
    ("proc.argc = 4", True),
    ("proc.cmdline = 'ssh -R 9000:localhost:22 host'", True),
    ("proc.pname = bash and proc.pexe = /usr/bin/bash", True),
    ("proc.anames intersects (bash)", True),
    ("exec.failed", False),
    ("not exec.failed", True),
    ("exec.failed = false", True),
    ("net.port = 22", False),               # not a connect record: missing
    ("not net.port = 22", True),
    ("net.port != 22", False),              # missing: every comparison is false
])
def test_operators(tmp_path, condition, expected):
    assert matcher(tmp_path, condition)(ssh_exec("-R", "9000:localhost:22", "host")) is expected


def test_precedence_not_and_or(tmp_path):
    rec = ssh_exec("host")
    # not binds tighter than and, and tighter than or
    assert matcher(tmp_path, "proc.name = bash or proc.name = ssh and proc.pid = 200")(rec) is True
    assert matcher(tmp_path, "(proc.name = bash or proc.name = ssh) and proc.pid = 1")(rec) is False
    assert matcher(tmp_path, "not proc.name = bash and proc.pid = 200")(rec) is True
    assert matcher(tmp_path, "not (proc.name = ssh and proc.pid = 1)")(rec) is True


def test_lists_in_conditions(tmp_path):
    sh = exec_record(BASH.child(300, "/bin/zsh"), ["zsh"])
    assert matcher(tmp_path, "proc.name in more_shells")(sh) is True          # nested list expanded
    assert matcher(tmp_path, "proc.name in shell_binaries")(sh) is False
    assert matcher(tmp_path, "proc.name in (shell_binaries, zsh)")(sh) is True
    # inside ( ), a word that names no list is a literal (Falco's way)
    assert matcher(tmp_path, "proc.name in (no_such_list, zsh)")(sh) is True
    assert matcher(tmp_path, "proc.exe pmatch tmp_dirs")(exec_record(Proc(exe="/dev/shm/x"), ["x"])) is True
    assert matcher(tmp_path, "proc.exe pmatch tmp_dirs")(exec_record(Proc(exe="/tmpx/x"), ["x"])) is False
    assert matcher(tmp_path, "proc.args regex evil_patterns")(ssh_exec("--donate-level=1")) is True
    assert matcher(tmp_path, "proc.exe_name glob name_globs")(exec_record(Proc(exe="/usr/bin/python3.11"),
                                                                          ["python3"])) is True


def test_quoting_and_escapes(tmp_path):
    rec = exec_record(BASH.child(300, "/bin/sh"), ["sh", "-c", "echo 'a, b' \"q\" (x)"])
    assert matcher(tmp_path, "proc.args contains \"'a, b'\"")(rec) is True
    assert matcher(tmp_path, "proc.args contains '\"q\" (x)'")(rec) is True
    assert matcher(tmp_path, r"proc.args contains 'a, b\' '")(rec) is True   # \' is the only escape
    assert matcher(tmp_path, r"proc.args regex '\(x\)$'")(rec) is True      # regex backslashes kept
    # a quoted word that looks like a list name is a literal
    rec2 = exec_record(Proc(exe="/bin/shell_binaries"), ["shell_binaries"])
    assert matcher(tmp_path, "proc.name = 'shell_binaries'")(rec2) is True
    assert matcher(tmp_path, "proc.name = shell_binaries")(rec2) is True      # = takes a literal


def test_ip_and_port_fields(tmp_path):
    loop = connect_record(Proc(), "127.0.0.1", 8080)
    ext = connect_record(Proc(), "203.0.113.5", 5901)
    v6 = connect_record(Proc(), "::1", 22)
    host = connect_record(Proc(), "10.1.2.3", 443)
    m = matcher(tmp_path, "net.ip in good_nets")
    assert [m(r) for r in (loop, ext, v6, host)] == [True, False, True, True]
    m = matcher(tmp_path, "net.port in some_ports")
    assert [m(r) for r in (loop, ext, v6, host)] == [False, True, True, False]
    assert matcher(tmp_path, "net.ip = 203.0.113.0/24")(ext) is True
    assert matcher(tmp_path, "net.dest = '[::1]:22'")(v6) is True
    assert matcher(tmp_path, "net.dest = 203.0.113.5:5901")(ext) is True
    unix = connect_record(Proc(), path="/run/docker.sock")
    assert matcher(tmp_path, "net.family = unix and net.path = /run/docker.sock")(unix) is True
    assert matcher(tmp_path, "net.ip in good_nets")(unix) is False


# ------------------------------------------------------------------ fields
def test_names_exe_location_fields(tmp_path):
    deleted = exec_record(Proc(exe="/tmp/x (deleted)", comm="kworker"), ["/tmp/x", "a"], filename="./x")
    assert matcher(tmp_path, "proc.names intersects (kworker) and proc.names intersects (x)")(deleted)
    assert matcher(tmp_path, "proc.exe_deleted and proc.exe_dir = /tmp and proc.exe_name = x")(deleted)
    assert matcher(tmp_path, "proc.name = x and not proc.exe_memfd")(deleted)
    memfd = exec_record(Proc(exe="/memfd:payload (deleted)"), ["p"])
    assert matcher(tmp_path, "proc.exe_memfd and proc.exe_deleted")(memfd)
    # argv[0] and the exec filename count as names: a renamed binary started as "ssh" is seen as ssh
    renamed = exec_record(Proc(exe="/tmp/x"), ["ssh", "host"], filename="/tmp/x")
    assert matcher(tmp_path, "proc.names intersects (ssh) and proc.name = x")(renamed)
    # for non-exec records argv comes from proc.cmdline
    conn = connect_record(Proc(exe="/usr/bin/ssh", cmdline=["ssh", "-F", "cfg", "h"]), "203.0.113.1", 22)
    assert matcher(tmp_path, "proc.args = cfg and proc.argc = 4")(conn)


def test_gpu_fields(tmp_path):
    p = Proc()
    root = gpu_first_use(p, 0x2B, 0x41, first_device=True)
    assert matcher(tmp_path, "gpu.name = RM_ALLOC and gpu.class = NV01_ROOT_CLIENT")(root)
    assert matcher(tmp_path, "gpu.meaning = context_create and gpu.first_device")(root)
    assert matcher(tmp_path, "gpu.device = nvidia and gpu.minor = 255 and gpu.total = 1")(root)
    uvm = gpu_first_use(p, 0x30000001, device="nvidia-uvm", minor=0, major=510)
    assert matcher(tmp_path, "gpu.meaning = uvm_init and gpu.name = UVM_INITIALIZE")(uvm)
    counts = gpu_counts(p, [(0x2B, 0xC6C0, 2), (0x2A, 0x20800102, 98)], interval_ns=4 * 10**9)
    assert matcher(tmp_path, "gpu.kind = counts and gpu.total = 100 and gpu.rate = 25")(counts)
    assert matcher(tmp_path, "gpu.meanings intersects (compute_engine)")(counts)
    assert not matcher(tmp_path, "gpu.meaning exists")(counts)   # meaning: first_use only


def test_exit_fields(tmp_path):
    assert matcher(tmp_path, "exit.code = 3 and exit.status = 768 and not exit.signal exists")(
        exit_record(Proc(), 3))


# ------------------------------------------------------------------ getopt
SSH_SPEC = parse_spec(["1246AaCfGgKkMNnqsTtVvXxYyB:b:c:D:E:e:F:I:i:J:L:l:m:O:o:P:p:Q:R:S:W:w:",
                       "stop_at_operand=2"])


@pytest.mark.parametrize("args, opts, optargs, operands", [
    (["-R", "8080:localhost:22", "h"], ("-R",), ("-R=8080:localhost:22",), ("h",)),
    (["-R8080:localhost:22", "h"], ("-R",), ("-R=8080:localhost:22",), ("h",)),
    (["-NfR", "9000:x:22", "h"], ("-N", "-f", "-R"), ("-R=9000:x:22",), ("h",)),
    (["-fNL8080:x:80", "h"], ("-f", "-N", "-L"), ("-L=8080:x:80",), ("h",)),
    (["-p", "R", "h"], ("-p",), ("-p=R",), ("h",)),
    (["-i", "~/.ssh/id_R", "h"], ("-i",), ("-i=~/.ssh/id_R",), ("h",)),
    (["-l", "R", "h"], ("-l",), ("-l=R",), ("h",)),
    (["-vp2222", "h"], ("-v", "-p"), ("-p=2222",), ("h",)),
    (["-oRemoteForward=9000 x:22", "h"], ("-o",), ("-o=RemoteForward=9000 x:22",), ("h",)),
    (["h", "-D", "1080"], ("-D",), ("-D=1080",), ("h",)),           # options after the host
    (["h", "ls", "-R"], (), (), ("h", "ls", "-R")),                  # ... not in the remote command
    (["--", "h", "-R", "x"], (), (), ("h", "-R", "x")),
    (["-R"], ("-R",), (), ()),                                       # missing value
    (["-Z", "h"], ("-Z",), (), ("h",)),                              # unknown letters are flags
    (["-", "h"], (), (), ("-", "h")),
])
def test_getopt_ssh(args, opts, optargs, operands):
    parsed = parse_args(SSH_SPEC, args)
    assert (parsed.opts, parsed.optargs, parsed.operands) == (opts, optargs, operands)


def test_getopt_long_options_and_modes():
    spec = parse_spec(["lc:e:", "--exec=", "--sh-exec=", "--listen", "--keep-open"])
    p = parse_args(spec, ["--sh-ex", "bash -i", "--listen", "h", "--exec=/bin/sh", "--unknown", "-le/bin/sh"])
    assert p.opts == ("--sh-exec", "--listen", "--exec", "--unknown", "-l", "-e")
    assert p.optargs == ("--sh-exec=bash -i", "--exec=/bin/sh", "-e=/bin/sh")
    assert p.operands == ("h",)
    # an ambiguous abbreviation stays as given
    assert parse_args(spec, ["--ke", "--e"]).opts == ("--keep-open", "--exec")
    assert parse_args(parse_spec(["--exec=", "--exit"]), ["--ex"]).opts == ("--ex",)
    # '+': POSIX, options end at the first operand; default: GNU permutation
    assert parse_args(parse_spec(["+ab:"]), ["x", "-a"]).opts == ()
    assert parse_args(parse_spec(["ab:"]), ["x", "-a"]).opts == ("-a",)
    # optional argument, attached only
    opt = parse_spec(["o::v"])
    assert parse_args(opt, ["-ofile", "-o", "x"]).optargs == ("-o=file",)
    assert parse_args(opt, ["-ofile", "-o", "x"]).operands == ("x",)


@pytest.mark.parametrize("items, error", [
    (["ab%"], "bad short option string 'ab%': '%' at 2"),
    (["--"], "bad long option '--'"),
    (["stop_at_operand=0"], "bad option spec item 'stop_at_operand=0': stop_at_operand needs a number >= 1"),
])
def test_bad_option_specs(items, error):
    with pytest.raises(ValueError) as e:
        parse_spec(items)
    assert str(e.value) == error


def test_getopt_fields_in_conditions(tmp_path):
    m = matcher(tmp_path, "proc.opts[ssh_getopt] intersects (-R, -L, -D, -w)")
    assert m(ssh_exec("-NfR", "9000:x:22", "h")) is True
    assert m(ssh_exec("-p", "R", "h")) is False
    m = matcher(tmp_path, "proc.optargs[ssh_getopt] regex '(?i)^-o=\\s*remoteforward'")
    assert m(ssh_exec("-o", "remoteforward 9000 x:22", "h")) is True
    assert matcher(tmp_path, "proc.operands[ssh_getopt] = h")(ssh_exec("-p", "22", "h")) is True


# ------------------------------------------------------------------ parse errors
@pytest.mark.parametrize("text, reason", [
    ("", "empty condition"),
    ("proc.name =", "expected a value or '(', found end of condition"),
    ("proc.name = ssh bash", "expected 'and', 'or' or end of condition, found 'bash' at char 17"),
    ("(proc.name = ssh", "expected ')' to close '(' at char 1, found end of condition"),
    ("proc.name in (a b)", "expected ',' or ')' in list, found 'b'"),
    ("proc.name in ()", "expected a value in list, found ')'"),
    ("proc.nmae = ssh", "unknown field 'proc.nmae' (did you mean 'proc.name'?)"),
    ("proc.name", "field 'proc.name' needs an operator, found end of condition"),
    ("proc.pid contains 1", "operator 'contains' does not apply to int field 'proc.pid'"),
    ("proc.pid = ssh", "expected a number or range, got 'ssh'"),
    ("proc.pid < (1, 2)", "operator '<' takes one number"),
    ("net.ip in (300.1.1.1)", "expected an address or CIDR, got '300.1.1.1'"),
    ("exec.failed = maybe", "expected true or false, got 'maybe'"),
    ("proc.exe regex '(ab'", "bad regex '(ab': missing ), unterminated subpattern at position 0"),
    ("proc.exe pmatch tmp", "pmatch takes absolute paths, got 'tmp'"),
    ("proc.opts = -R", "field 'proc.opts' needs a list argument: proc.opts[LIST]"),
    ("proc.name[x_y] = a", "field 'proc.name' takes no argument"),
    ("proc.name = 'abc", "unterminated string starting at char 13"),
    ("proc.name ! ssh", "unexpected '!' at char 11"),
    ("and proc.name = a", "expected a field, a macro or '(', found 'and' at char 1"),
])
def test_parse_errors(text, reason):
    with pytest.raises(ConditionError) as e:
        parse(text)
    assert e.value.reason == reason


# ------------------------------------------------------------------ file errors
def load_error(tmp_path: Path, text: str, *, defaults: bool = False) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as e:
        load_ruleset([path], defaults=defaults)
    msg = str(e.value)
    assert "\n" not in msg
    assert isinstance(e.value, AgentprobeError)
    return msg.replace(str(path), "FILE")


def test_error_syntax_in_condition(tmp_path):
    assert load_error(tmp_path, """
        - rule: r1
          desc: d
          priority: high
          condition: proc.name = ssh bash
        """) == "FILE:4: rule 'r1': expected 'and', 'or' or end of condition, found 'bash' at char 17"


def test_error_line_inside_a_block_condition(tmp_path):
    assert load_error(tmp_path, """
        - rule: r1
          desc: d
          priority: high
          condition: |
            evt.type = exec
            and proc.nmae = ssh
        """) == "FILE:6: rule 'r1': unknown field 'proc.nmae' (did you mean 'proc.name'?)"


def test_error_unknown_field(tmp_path):
    assert load_error(tmp_path, rule_yaml("proc.exe_path = /x", "r2")) == \
        "FILE:3: rule 'r2': unknown field 'proc.exe_path' (did you mean 'proc.exe_name'?)"


def test_error_unknown_key_in_rule(tmp_path):
    assert load_error(tmp_path, """
        - rule: r1
          desc: d
          priority: high
          conditon: proc.name = ssh
        """) == ("FILE:4: rule 'r1': unknown key 'conditon' (allowed: action, condition, count, dedup, desc, "
                 "enabled, name, output, priority, rule, sequence, tags)")


def test_error_bad_regex_literal(tmp_path):
    assert load_error(tmp_path, rule_yaml("proc.exe regex '[a-'", "r3")) == \
        "FILE:3: rule 'r3': bad regex '[a-': unterminated character set at position 0"


def test_error_bad_regex_in_list_points_at_the_item(tmp_path):
    assert load_error(tmp_path, """
        - list: my_patterns
          items:
            - 'good'
            - '(bad'
        - rule: r1
          desc: d
          priority: high
          condition: proc.args regex my_patterns
        """) == "FILE:4: list 'my_patterns': bad regex '(bad': missing ), unterminated subpattern at position 0"


def test_error_bad_cidr_in_appended_list_points_at_the_other_file(tmp_path):
    base = write(tmp_path, """
        - list: my_nets
          items: [10.0.0.0/8]
        - rule: r1
          desc: d
          priority: high
          condition: net.ip in my_nets
        """, "base.yaml")
    extra = write(tmp_path, """
        - list: my_nets
          append: true
          items: [10.0.0.0/8, 10.0.0.0/40]
        """, "extra.yaml")
    with pytest.raises(RuleError) as e:
        load_ruleset([base, extra], defaults=False)
    assert str(e.value) == f"{extra}:3: list 'my_nets': expected an address or CIDR, got '10.0.0.0/40'"


def test_error_duplicate_rule_id(tmp_path):
    assert load_error(tmp_path, rule_yaml("proc.name = a", "dup") + rule_yaml("proc.name = b", "dup")) == \
        "FILE:6: rule 'dup': duplicate rule id (first defined at line 1)"


def test_error_duplicate_list_in_one_file(tmp_path):
    assert load_error(tmp_path, """
        - list: a_b
          items: [x]
        - list: a_b
          items: [y]
        """) == "FILE:3: list 'a_b': duplicate list name (first defined at line 1)"


def test_error_macro_cycle_in_one_file(tmp_path):
    assert load_error(tmp_path, """
        - macro: m1
          condition: m2 and proc.pid = 1
        - macro: m2
          condition: proc.pid = 2 or m3
        - macro: m3
          condition: m1
        """) == "FILE:1: macro 'm1': macro cycle: m1 -> m2 -> m3 -> m1"


def test_error_macro_cycle_across_files(tmp_path):
    base = write(tmp_path, """
        - macro: m1
          condition: proc.pid = 1
        - macro: m2
          condition: m1
        """, "base.yaml")
    extra = write(tmp_path, """
        - macro: m1
          condition: m2
        """, "extra.yaml")
    with pytest.raises(RuleError) as e:
        load_ruleset([base, extra], defaults=False)
    assert str(e.value) == f"{extra}:1: macro 'm1': macro cycle: m1 -> m2 -> m1"


def test_error_self_referencing_macro(tmp_path):
    assert load_error(tmp_path, """
        - macro: m1
          condition: m1
        """) == "FILE:1: macro 'm1': macro cycle: m1 -> m1"


def test_error_unknown_list(tmp_path):
    assert load_error(tmp_path, rule_yaml("proc.name in shell_binarys", "r4")) == \
        "FILE:3: rule 'r4': unknown list 'shell_binarys'"


def test_error_unknown_list_in_field_argument(tmp_path):
    assert load_error(tmp_path, rule_yaml("proc.opts[no_spec] = -R", "r4")) == \
        "FILE:3: rule 'r4': unknown list 'no_spec'"


def test_error_unknown_macro(tmp_path):
    assert load_error(tmp_path, rule_yaml("spawned and proc.name = x", "r5")) == \
        "FILE:3: rule 'r5': unknown macro 'spawned'"


def test_error_unknown_reference_inside_a_macro_points_at_the_macro(tmp_path):
    assert load_error(tmp_path, """
        - macro: m1
          condition: proc.name in no_such_list
        - rule: r1
          desc: d
          priority: high
          condition: m1
        """) == "FILE:2: macro 'm1': unknown list 'no_such_list'"


def test_error_yaml_syntax(tmp_path):
    assert load_error(tmp_path, """
        - rule: r1
          desc: [unclosed
          priority: high
        """) == "FILE:3: YAML error: expected ',' or ']', but got ':'"


def test_error_duplicate_yaml_key(tmp_path):
    assert load_error(tmp_path, """
        - rule: r1
          desc: d
          desc: e
        """) == "FILE:3: YAML error: duplicate key 'desc'"


@pytest.mark.parametrize("body, message", [
    ("  desc: d\n  condition: proc.pid = 1\n", "FILE:1: rule 'r': missing 'priority'"),
    ("  priority: high\n  condition: proc.pid = 1\n", "FILE:1: rule 'r': missing 'desc'"),
    ("  desc: d\n  priority: urgent\n  condition: proc.pid = 1\n",
     "FILE:3: rule 'r': priority must be one of critical, high, medium, low, info, not 'urgent'"),
    ("  desc: d\n  priority: high\n  action: block\n  condition: proc.pid = 1\n",
     "FILE:4: rule 'r': action must be one of alert, freeze, kill, not 'block'"),
    ("  desc: d\n  priority: high\n  enabled: yes please\n  condition: proc.pid = 1\n",
     "FILE:4: rule 'r': 'enabled' must be true or false"),
    ("  desc: d\n  priority: high\n  dedup: soon\n  condition: proc.pid = 1\n",
     "FILE:4: rule 'r': bad duration 'soon' (use e.g. 500ms, 60s, 5m, 1h)"),
    ("  desc: d\n  priority: high\n  output: '%proc.nope here'\n  condition: proc.pid = 1\n",
     "FILE:4: rule 'r': unknown field '%proc.nope' in output"),
    ("  desc: d\n  priority: high\n  condition: proc.pid = 1\n  count: {by: pod, within: 1m, threshold: 2}\n",
     "FILE:5: rule 'r': count.by must be one of process, cgroup"),
    ("  desc: d\n  priority: high\n  condition: proc.pid = 1\n  count: {by: process, threshold: 2}\n",
     "FILE:5: rule 'r': 'count' needs 'within' (e.g. 60s)"),
    ("  desc: d\n  priority: high\n  condition: proc.pid = 1\n  count: {by: process, within: 1m, threshold: 0}\n",
     "FILE:5: rule 'r': count.threshold must be a whole number >= 1"),
    ("  desc: d\n  priority: high\n  condition: proc.pid = 1\n"
     "  count: {by: process, within: 1m, threshold: 2, sum: proc.name}\n",
     "FILE:5: rule 'r': count.sum needs a number field, 'proc.name' is str"),
    ("  desc: d\n  priority: high\n  condition: proc.pid = 1\n"
     "  count: {by: process, within: 1m, threshold: 2, window: 3}\n",
     "FILE:5: rule 'r': unknown key 'count.window' (allowed: by, distinct, sum, threshold, within)"),
    ("  desc: d\n  priority: high\n  sequence: {by: process, within: 1m, steps: [proc.pid = 1]}\n",
     "FILE:4: rule 'r': sequence.steps must be a list of at least two conditions"),
    ("  desc: d\n  priority: high\n  sequence:\n    by: process\n    within: 1m\n    steps:\n"
     "      - proc.pid = 1\n      - proc.pid = = 2\n",
     "FILE:9: rule 'r': step: expected a value or '(', found '='"),
    ("  desc: d\n  priority: high\n  condition: proc.pid = 1\n  sequence: {by: process, within: 1m, steps: [a, b]}\n",
     "FILE:5: rule 'r': a rule has 'condition' or 'sequence', not both"),
])
def test_rule_key_errors(tmp_path, body, message):
    assert load_error(tmp_path, "- rule: r\n" + body) == message


def test_error_list_name_needs_an_underscore(tmp_path):
    assert load_error(tmp_path, "- list: shells\n  items: [sh]\n") == (
        "FILE:1: list 'shells': a list name is an identifier with an underscore (e.g. ssh_binaries), "
        "so conditions can tell it from a value")


def test_error_item_kind(tmp_path):
    assert load_error(tmp_path, "- rule: a\n  macro: b\n") == \
        "FILE:1: an item has exactly one of 'list', 'macro' or 'rule'"
    assert load_error(tmp_path, "- just a string\n") == \
        "FILE:1: expected a mapping with 'list', 'macro' or 'rule'"
    assert load_error(tmp_path, "rule: a\n") == "FILE:1: a rule file is a YAML list of list/macro/rule items"


def test_error_append_and_modify_unknown(tmp_path):
    assert load_error(tmp_path, "- list: no_list\n  append: true\n  items: [a]\n") == \
        "FILE:1: list 'no_list': append to a list that is not defined"
    assert load_error(tmp_path, "- rule: nope\n  enabled: true\n") == (
        "FILE:1: rule 'nope': no such rule to modify (a rule item without 'condition' or 'sequence' "
        "changes an existing rule)")


def test_error_unreadable_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RuleError) as e:
        load_ruleset([missing], defaults=False)
    assert str(e.value) == f"{missing}: cannot read: No such file or directory"


# ------------------------------------------------------------------ merging
def test_override_and_append_by_name(tmp_path):
    base = write(tmp_path, """
        - list: bad_names
          items: [xmrig]
        - macro: is_bad
          condition: proc.name in bad_names
        - rule: bad_started
          desc: a bad program
          condition: evt.type = exec and is_bad
          priority: high
          tags: [T1496]
        - rule: other
          desc: other
          condition: proc.name = other
          priority: low
          enabled: false
        """, "base.yaml")
    site = write(tmp_path, """
        - list: bad_names
          append: true
          items: [minerd]
        - rule: other
          enabled: true
          priority: medium
        """, "site.yaml")
    rs = load_ruleset([base, site], defaults=False)
    assert rs.lists["bad_names"] == ("xmrig", "minerd")
    assert rs.get("other").enabled is True and rs.get("other").spec.priority == "medium"
    m = rs.get("bad_started").match
    assert m(EventView(exec_record(Proc(exe="/tmp/minerd"), ["minerd"]))) is True
    # a later macro with the same name replaces the earlier one, for every rule using it
    site2 = write(tmp_path, """
        - macro: is_bad
          condition: proc.name = evil
        """, "site2.yaml")
    rs = load_ruleset([base, site2], defaults=False)
    m = rs.get("bad_started").match
    assert m(EventView(exec_record(Proc(exe="/tmp/xmrig"), ["xmrig"]))) is False
    assert m(EventView(exec_record(Proc(exe="/tmp/evil"), ["evil"]))) is True
    infos = {i.id: i for i in list_rules(rs)}
    assert infos["bad_started"].mitre == ("T1496",)
    assert infos["bad_started"].origin == f"{base}:5"


def test_modify_count_threshold(tmp_path):
    base = write(tmp_path, """
        - rule: many
          desc: many
          condition: evt.type = connect
          count: {by: process, within: 60s, threshold: 20, distinct: net.dest}
          priority: high
        """, "base.yaml")
    site = write(tmp_path, """
        - rule: many
          count: {threshold: 50}
        """, "site.yaml")
    spec = load_ruleset([base, site], defaults=False).get("many").spec.count
    assert (spec.threshold, spec.within_ns, spec.distinct, spec.by) == (50, 60 * 10**9, "net.dest", "process")


def test_rule_replaced_by_name(tmp_path):
    base = write(tmp_path, rule_yaml("proc.name = a", "r"), "base.yaml")
    site = write(tmp_path, rule_yaml("proc.name = b", "r"), "site.yaml")
    rs = load_ruleset([base, site], defaults=False)
    assert len(rs) == 1 and rs.get("r").spec.condition == "proc.name = b"


def test_extra_lists_from_the_program(tmp_path):
    rs = load_ruleset(extra_lists={"ssh_client_sha256": ["ab" * 32]})
    assert rs.lists["ssh_client_sha256"] == ("ab" * 32,)
    with pytest.raises(RuleError) as e:
        load_ruleset(extra_lists={"no_such_list": ["x"]})
    assert str(e.value) == "list 'no_such_list' (given by the program) is not defined in any rule file"


def test_check_file_alone_and_over_defaults(tmp_path):
    ok = write(tmp_path, """
        - list: allowed_networks
          append: true
          items: [10.20.0.0/16]
        - rule: egress_outside_allowlist
          enabled: true
        """, "ok.yaml")
    rs = check_file(ok)
    assert rs.get("egress_outside_allowlist").enabled is True
    assert "10.20.0.0/16" in rs.lists["allowed_networks"]
    # alone: file-local mistakes, even in a rule that would later be replaced
    bad = write(tmp_path, rule_yaml("proc.name = = x", "r"), "bad.yaml")
    with pytest.raises(RuleError, match=r"bad.yaml:3: rule 'r': expected a value"):
        check_file(bad)
    # merged: references resolve against the defaults
    uses_default = write(tmp_path, rule_yaml("outbound_connect and net.port = 25", "smtp"), "smtp.yaml")
    assert check_file(uses_default).get("smtp").types == frozenset({"connect"})
    typo = write(tmp_path, rule_yaml("outbound_conect and net.port = 25", "smtp"), "typo.yaml")
    with pytest.raises(RuleError) as e:
        check_file(typo)
    assert str(e.value) == f"{typo}:3: rule 'smtp': unknown macro 'outbound_conect'"


def test_record_types_are_inferred(tmp_path):
    path = write(tmp_path, LISTS + textwrap.dedent("""
        - macro: is_exec
          condition: evt.type = exec
        - rule: a
          desc: d
          priority: low
          condition: is_exec and proc.name = x
        - rule: b
          desc: d
          priority: low
          condition: net.port = 22 or gpu.nr = 1
        - rule: c
          desc: d
          priority: low
          condition: not net.port = 22
        - rule: d
          desc: d
          priority: low
          condition: evt.type in (exec, connect) and proc.name = x
        """))
    rs = load_ruleset([path], defaults=False)
    assert rs.get("a").types == frozenset({"exec"})
    assert rs.get("b").types == frozenset({"connect", "packet", "flow_counts", "gpu"})  # net.*: destinations
    assert rs.get("c").types is None
    assert rs.get("d").types == frozenset({"exec", "connect"})


def test_falco_priority_names_are_accepted(tmp_path):
    path = write(tmp_path, "- rule: r\n  desc: d\n  priority: WARNING\n  condition: proc.pid = 1\n")
    assert load_ruleset([path], defaults=False).get("r").spec.priority == "medium"


def test_docs_list_every_field():
    from agentprobe.rules.fields import FIELDS

    doc = (Path(__file__).resolve().parent.parent / "docs" / "rules.md").read_text()
    for f in FIELDS.values():
        name = f.name + ("[LIST]" if f.make else "")
        assert f"| `{name}` | {f.type} |" in doc, name


def test_modification_errors(tmp_path):
    assert load_error(tmp_path, "- rule: ssh_port_forwarding\n  count: {threshold: 3}\n", defaults=True) == \
        "FILE:2: rule 'ssh_port_forwarding': the rule has no 'count' to change"
    assert load_error(tmp_path, "- rule: ssh_port_forwarding\n  priority: severe\n", defaults=True) == \
        "FILE:2: rule 'ssh_port_forwarding': priority must be one of critical, high, medium, low, info, not 'severe'"
    assert load_error(tmp_path, "- rule: internal_network_probing\n  count: {threshold: -1}\n",
                      defaults=True) == "FILE:2: rule 'internal_network_probing': count.threshold must be a whole " \
                                        "number >= 1"


def test_the_default_file_checks_clean():
    from agentprobe.rules import default_rules_text

    _, name = default_rules_text()
    assert len(check_file(name)) == len(load_ruleset())
