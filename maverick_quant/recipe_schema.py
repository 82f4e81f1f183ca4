"""Checking parsed YAML against dataclasses: the generic half of recipe_file.py.

A recipe section is a mapping whose keys must be a dataclass's fields and whose values must
have the fields' types (`section`, `check_type`); a refusal is an InputError naming the key
as the recipe spells it ("quantize.moe.policy='x': expected one of ..."), with `prefixed`
adding the section to errors a dataclass raises itself. `unique_keys_loader` is the YAML
loader that refuses a key given twice in one mapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import types
import typing
from typing import Any

from maverick_quant.errors import InputError


def section(key: str, data: Any, fields: dict[str, Any] | type) -> dict[str, Any]:
    """Keyword arguments from the mapping `data`, each key checked against `fields` (a
    dataclass or {name: type}) and each value against its type."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{key}: expected a mapping, got {type(data).__name__}")
    fields = field_types(fields) if isinstance(fields, type) else fields
    out = {}
    for name, value in data.items():
        if name not in fields:
            raise InputError(f"{key}.{name}: unknown key; expected one of {', '.join(fields)}")
        out[name] = check_type(f"{key}.{name}", value, fields[name])
    return out


def check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` as the field type `hint` (bool, int, float, str, an enum, optional or tuple of str)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [member.value for member in hint]
        if value not in allowed:
            raise InputError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
        return hint(value)
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(hint)
    if expected is None:
        raise InputError(f"{key}: unsupported field type {hint}")
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        raise InputError(f"{key}={value!r}: expected {hint.__name__}")
    return float(value) if hint is float else value


def field_types(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """{field name: type} of dataclass `cls`, in declaration order, without `skip`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in skip}


def one_of(key: str, value: Any, allowed: tuple) -> None:
    """InputError naming `key` and the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise InputError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


def refuse_repeats(key: str, values: list[str], why: str) -> None:
    """InputError naming the first value of `values` that comes twice."""
    seen = set()
    for value in values:
        if value in seen:
            raise InputError(f"{key}: {value} appears twice ({why})")
        seen.add(value)


@contextlib.contextmanager
def prefixed(prefix: str):
    """Prefix the key an InputError names with its recipe section ("bits=9" -> "quantize.bits=9")."""
    try:
        yield
    except InputError as exc:
        raise InputError(f"{prefix}{exc}") from None


def plain(value: Any) -> Any:
    """`value` with every tuple made a list (YAML's safe dumper writes no tuples)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def unique_keys_loader():
    """yaml.SafeLoader refusing a key given twice in one mapping (YAML keeps the last silently:
    a second `gates:` dropped the first list, a second `quantize:` the whole first section)."""
    import yaml

    class UniqueKeysLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, merged by SafeLoader itself
                continue
            key = loader.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise InputError(f"line {line}: key {key!r} is given twice in one mapping (first on line "
                                     f"{first_line[key]}); YAML would keep only the last")
                first_line[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    UniqueKeysLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeysLoader
