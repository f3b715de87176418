"""The configuration file: every `agentprobe watch` option, as YAML.

    # /etc/agentprobe/config.yaml
    cgroup-glob: ["kubepods.slice/**/*agent*"]
    output: [/var/log/agentprobe/stream.msgpack, "nats://nats.internal:4222?stream=AGENTPROBE"]
    metrics: "127.0.0.1:9477"
    rules: [/etc/agentprobe/site-rules.yaml]

Keys are the long option names (`cgroup-glob` or `cgroup_glob`); an option given on the
command line wins over the file. Values are checked against the option's type: an unknown
key or a wrong type is one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import yaml

from .errors import AgentprobeError

DEFAULT_CONFIG = "/etc/agentprobe/config.yaml"
DEFAULT_CONFIG_ENV = "AGENTPROBE_DEFAULT_CONFIG"  # another default file (tests, images that keep it elsewhere)
NOT_IN_FILE = {"config"}  # options that make no sense inside the file itself


class ConfigError(AgentprobeError):
    pass


def config_key(param: click.Option) -> str:
    """The file key of an option: its long name without dashes in front (`--cgroup-glob` -> `cgroup-glob`)."""
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs[0] if longs else param.opts[0]).lstrip("-")


def options_of(command: click.Command) -> dict[str, click.Option]:
    return {config_key(p): p for p in command.params
            if isinstance(p, click.Option) and config_key(p) not in NOT_IN_FILE and not p.hidden
            and p.name not in ("help", "version")}


def default_of(param: click.Option) -> Any:
    """The option's default as a plain value (click 8.3+ marks 'no default' with a sentinel)."""
    d = param.default
    if d is not None and not isinstance(d, (str, int, float, bool, list, tuple)):
        d = None
    if param.multiple:
        return list(d or ())
    if d is None and param.is_flag:
        return False
    return d


def _type_name(param: click.Option) -> str:
    t = param.type
    if param.is_flag or isinstance(t, click.types.BoolParamType):
        base = "true or false"
    elif isinstance(t, click.Choice):
        base = "one of " + ", ".join(map(str, t.choices))
    elif isinstance(t, click.types.IntParamType):
        base = "an integer"
    elif isinstance(t, click.types.FloatParamType):
        base = "a number"
    else:
        base = "a string"
    return f"a list of {'integers' if base == 'an integer' else 'strings'} (or {base})" if param.multiple else base


def _check_one(param: click.Option, v: Any) -> bool:
    t = param.type
    if param.is_flag or isinstance(t, click.types.BoolParamType):
        return isinstance(v, bool)
    if isinstance(t, click.Choice):
        return isinstance(v, str) and v in t.choices
    if isinstance(t, click.types.IntParamType):
        return isinstance(v, int) and not isinstance(v, bool)
    if isinstance(t, click.types.FloatParamType):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, str) and v != ""


def load_config(path: str | os.PathLike, command: click.Command) -> dict[str, Any]:
    """{parameter name: value} for click's default_map, checked; raises ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of option: value, got {type(data).__name__}")
    table = options_of(command)
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("_", "-")
        param = table.get(key)
        if param is None:
            raise ConfigError(f"config {path}: unknown key {raw_key!r} (known: {', '.join(sorted(table))})")
        if param.multiple:
            items = value if isinstance(value, list) else [value]
            ok = all(_check_one(param, v) for v in items)
            value = items
        else:
            ok = (value is None and default_of(param) is None) or _check_one(param, value)
        if not ok:
            raise ConfigError(f"config {path}: {raw_key!r} must be {_type_name(param)}, "
                              f"not {value!r} ({type(value).__name__})")
        out[param.name] = value
    return out


def default_config() -> str:
    """/etc/agentprobe/config.yaml, or what $AGENTPROBE_DEFAULT_CONFIG names."""
    return os.environ.get(DEFAULT_CONFIG_ENV) or DEFAULT_CONFIG


def resolve_config(given: str | None) -> str | None:
    """The file to read: the one given (must exist), else the default one if it exists."""
    if given:
        if not Path(given).is_file():
            raise ConfigError(f"cannot read config {given}: no such file")
        return given
    default = default_config()
    return default if Path(default).is_file() else None


def effective(command: click.Command, values: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, source) of every option: from the file, or the default."""
    rows = []
    for key, param in options_of(command).items():
        if param.name in values:
            rows.append((key, values[param.name], "config"))
        else:
            rows.append((key, default_of(param), "default"))
    return rows


def dump(rows: list[tuple[str, Any, str]], path: str | None) -> str:
    lines = [f"# effective configuration of agentprobe watch ({'from ' + path if path else 'no config file'})"]
    for key, value, source in rows:
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        lines.append(f"{text:<60} # {source}")
    return "\n".join(lines) + "\n"
