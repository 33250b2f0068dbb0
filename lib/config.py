"""Config: dataclass defaults -> --config file.yaml -> --section.key=value, strictly checked.

Unknown keys fail with the closest valid key; wrong types fail naming the key, the expected and the
given type; ints are accepted for floats. YAML is read with yaml.safe_load only; nothing is executed.
"""
import dataclasses
import difflib
import json
import os
import platform
import subprocess
import sys
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config problem the user must fix; the message says what and how."""


def _suggest(key, valid):
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key):
    """Check `value` against the annotation `tp`; return it converted where the conversion is lossless."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (typing.Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (typing.Any, typing.Any)
        return {_coerce(k, key_tp, f"{key}.key"): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(
        f"config key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")


def validate(cfg):
    """Run every `validate()` of the config tree, sections before the config that holds them."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def merge(cfg, updates, prefix="", check=True):
    """Return a copy of dataclass `cfg` with the nested dict `updates` applied, checking keys and types.

    The result is validated once, as a whole (check=False skips that: `parse` merges several sources and
    validates the final config only, so values that are valid together never fail one source at a time).
    """
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix or '<top>'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{f}" for f in fields]
            raise ConfigError(f"unknown config key '{full}'{_suggest(full, valid)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, prefix=f"{full}.", check=False)
        else:
            changes[key] = _coerce(value, hints[key], full)
    out = dataclasses.replace(cfg, **changes)
    return validate(out) if check else out


def _nest(dotted, value):
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _deep_update(base, new):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_yaml(path):
    """Read a YAML mapping with yaml.safe_load; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path given to --config)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(args):
    """Turn ['--a.b=1', '--c', 'x'] into a nested dict; values are parsed as YAML scalars/lists."""
    updates = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            key, raw = body, "true"  # a bare flag means true
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _deep_update(updates, _nest(key.replace("-", "_"), value))
        i += 1
    return updates


def parse(defaults, argv=None):
    """Build the config: `defaults` (a dataclass instance) -> --config file -> --key=value overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    files = []
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path, e.g. --config configs/quickstart.yaml")
            files.append(argv[i + 1])
            i += 2
        elif argv[i].startswith("--config="):
            files.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    cfg = defaults
    for f in files:
        cfg = merge(cfg, load_yaml(f), check=False)
    return merge(cfg, parse_overrides(rest))  # validated once, after every source is in


def to_dict(cfg):
    """The config as plain data (dicts, lists, numbers, strings): safe for YAML, JSON and checkpoints."""
    return dataclasses.asdict(cfg)


def from_dict(defaults, data):
    """Rebuild a config from `to_dict` output (e.g. from a checkpoint), checked like a YAML file."""
    return merge(defaults, data)


def git_commit():
    """The current git commit of the code (with '-dirty' if modified), or 'unknown' outside a repo."""
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def write_run_info(run_dir, cfg, device=None, argv=None):
    """Write config.yaml (resolved config) and run_info.json (commit, command, versions, device)."""
    import torch
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "git_commit": git_commit(),
        "command": " ".join([sys.executable] + list(sys.argv if argv is None else argv)),
        "cwd": os.getcwd(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "hostname": platform.node(),
    }
    with open(run_dir / "run_info.json", "w") as f:
        json.dump(info, f, indent=2)
    return info
