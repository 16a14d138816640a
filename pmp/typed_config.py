"""Typed configs: dataclasses whose fields carry a one-line doc, loaded from a YAML recipe + `--set a.b=value`
overrides + CLI flags, with a clear error for every wrong key or value.

Every verb's config is built with this machinery (`pmp.config.RunConfig` / `ExportConfig`, `pmp.eval.config`,
`pmp.pipeline.PipelineConfig`): a misspelled key names the closest valid one, a value of the wrong type names the
field and the expected type -- never a silent default. `field_docs` feeds `pmp <verb> --help`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def doc(text: str, default: Any = dataclasses.MISSING, **kw):
    """A dataclass field with a help line attached."""
    if default is dataclasses.MISSING and "default_factory" not in kw:
        raise TypeError("doc() needs a default")
    if default is dataclasses.MISSING:
        return field(metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


def check(ok: bool, msg: str, *args) -> None:
    """Raise ValueError(msg.format(*args)) unless `ok`: the validation idiom of every config."""
    if not ok:
        raise ValueError(msg.format(*args))




def field_docs(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, doc) for every leaf field, for --help."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        val = getattr(inst, f.name)
        if dataclasses.is_dataclass(val):
            rows += field_docs(type(val), key + ".")
        else:
            rows.append((key, _type_name(f.type), val, f.metadata.get("doc", "")))
    return rows


def _resolved_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check/convert a YAML or CLI value to the field's declared type (`Any`: kept as given; the config's own
    `validate` checks it, as `pmp.study.StudyConfig` does its variants' overrides against `RunConfig`)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict:  # NAME -> value: a YAML mapping, or NAME=VALUE strings from the command line
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            pairs = {}
            for item in value:
                if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0]:
                    raise ValueError(f"{key}: expected NAME=VALUE, got {item!r}")
                name, val = item.split("=", 1)
                if name in pairs:
                    raise ValueError(f"{key}: name {name!r} given twice")
                pairs[name] = val
            value = pairs
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of NAME: VALUE (or NAME=VALUE items), got {value!r}")
        vt = typing.get_args(tp)[1]
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _unknown_key(key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"unknown config key {key!r}{hint}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = _resolved_types(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    all_keys = [prefix + n for n in names]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key, all_keys)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ValueError(f"{key}: expected a section (mapping), got {v!r}")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def from_dict(cls: type[C], data: dict | None) -> C:
    """An instance of the config class `cls` with the values of `data` applied (not validated)."""
    cfg = cls()
    _apply(cfg, data or {})
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 1e-3) with YAML scalar parsing of the value."""
    if "=" not in text:
        raise ValueError(f"--set expects key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ValueError(f"--set {text}: the value {raw!r} is not a plain YAML value (quote it, e.g. "
                         f"{key}='{raw}')") from None
    return key.strip().split("."), value


def load_yaml_mapping(path: str | Path, what: str, hint: str = "") -> dict:
    """A YAML file that must hold a mapping; clear errors for a missing file, bad YAML or another shape."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}{hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {p} must hold a mapping, got {type(data).__name__}")
    return data


def set_dotted(data: dict, keys: list[str], value: Any, what: str) -> None:
    """data[k1][k2]... = value, creating sections; a clear error when a key on the way is not a section."""
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"{what}: {k} is not a section")
    node[keys[-1]] = value


def load_typed(cls: type[C], path: str | Path | None = None, overrides: list[str] = (),
               values: dict[str, Any] | None = None) -> C:
    """YAML recipe (optional) + `--set` overrides + explicit values (dotted keys, e.g. from CLI flags; they win)
    -> a validated instance of `cls`."""
    data = {} if path is None else load_yaml_mapping(path, "config file", " (see configs/ for recipes)")
    for ov in overrides:
        keys, value = parse_override(ov)
        set_dotted(data, keys, value, f"--set {ov}")
    for key, value in (values or {}).items():
        set_dotted(data, key.split("."), value, key)
    cfg = from_dict(cls, data)
    validate = getattr(cfg, "validate", None)
    return validate() if validate else cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
