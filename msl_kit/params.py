"""Declared parameters: what a component takes, said once, beside the component.

A loss, a backbone (or a plugin's) declares its parameters as a dataclass whose fields are
made with `param(default, doc, ...)`: the annotation is the type, then the default, one line
of documentation and the allowed range. That one declaration is read by the component's own
constructor check (`Params.__post_init__`), by the config (`loss.<name>.<key>`,
`model.<family>.<key>`, `--set`), by sweeps, by the notebooks' sliders and by the docs:

    @dataclass(frozen=True)
    class ToyParams(Params):
        margin: float = param(0.1, "hinge margin", ge=0, lt=1)
        gamma: float = param(1.0, "exponent of the pair terms", gt=0, le=10)

A params class may also name presets (`PRESETS: ClassVar[dict[str, dict]]`): a config section
then takes `preset: NAME`, which fills in every key the section does not set.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from msl_kit.errors import MslKitError

PARAM = "msl_kit.param"  # the dataclass field metadata key `param` writes
_UNSET: Any = object()
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 6, 6, 3


def short(value: object) -> str:
    """A repr of `value` of bounded length, computed without walking all of a huge value."""
    return _REPR.repr(value)


class ParamError(MslKitError, ValueError):
    """A parameter value outside what its component declares; the message names the key."""


class ParamTypeError(ParamError, TypeError):
    """A parameter value of the wrong type (a string for a number, a float for an int)."""


@dataclass(frozen=True)
class Param:
    """What `param` records beside a field: its documentation and what it allows.

    `ge`/`gt`/`le`/`lt` bound numbers; `choices` lists the allowed values; `off` is a value
    allowed outside the bounds that means "the component's own" (0 or None), described as
    `off_means`; `allowed` replaces the generated description of the range and `hint` is
    appended to it ("released recipe: 2"); `ui` is a notebook slider's (min, max, step).
    """

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    off: Any = _UNSET
    off_means: str = ""
    allowed: str = ""
    hint: str = ""
    ui: tuple[float, float, float] | None = None

    def describe(self) -> str:
        """What the field allows, as the end of an error line ("use 0 < value <= 1000")."""
        if self.allowed:
            text = self.allowed
        elif self.choices is not None:
            text = f"use one of {', '.join(map(str, self.choices))}"
        else:
            text = f"use {_bounds(self.ge, self.gt, self.le, self.lt)}"
            if self.off is not _UNSET:
                text = f"use {self.off} ({self.off_means or 'off'}) or {text.removeprefix('use ')}"
        return f"{text} ({self.hint})" if self.hint else text

    def admits(self, value: object) -> bool:
        """Whether `value` (already of the field's type) lies in the declared range."""
        if self.off is not _UNSET and value == self.off:
            return True
        if self.choices is not None:
            return value in self.choices
        items = value if isinstance(value, list) else [value]
        numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return all(_within(v, self.ge, self.gt, self.le, self.lt) for v in numbers)


def _bounds(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f"{_num(ge)} <= " if ge is not None else f"{_num(gt)} < " if gt is not None else ""
    high = f" <= {_num(le)}" if le is not None else f" < {_num(lt)}" if lt is not None else ""
    if low and high:
        return f"{low}value{high}"
    if ge is not None:
        return f"{_num(ge)} or more"
    if gt is not None:
        return f"a value > {_num(gt)}"
    return f"a value{high}" if high else "any value"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _within(v: float, ge: float | None, gt: float | None, le: float | None, lt: float | None):
    return not (
        (ge is not None and not v >= ge)
        or (gt is not None and not v > gt)
        or (le is not None and not v <= le)
        or (lt is not None and not v < lt)
    )


def param(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with its default, one line of documentation and its checks (the
    keywords of `Param`: ge, gt, le, lt, choices, off, off_means, allowed, hint, ui)."""
    meta = {PARAM: Param(doc, **checks)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.lru_cache(maxsize=256)  # read on every construction of a params value
def declared(cls: type) -> dict[str, tuple[Any, Param | None]]:
    """{field name: (its type, its `Param` or None)} of a params dataclass, in order (shared:
    do not change the dict)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get(PARAM)) for f in dataclasses.fields(cls)}


def defaults(cls: type) -> dict[str, Any]:
    """The declared default of every field (a fresh copy of lists)."""
    return dataclasses.asdict(cls())


def presets(cls: type | None) -> dict[str, dict[str, Any]]:
    """The named presets of a params class ({} where it declares none)."""
    return dict(getattr(cls, "PRESETS", None) or {})


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` as the annotated type, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(value, option, key)
            except ParamTypeError as e:
                errors.append(e)
        raise errors[0] if errors else ParamTypeError(f"{key}: bad value {short(value)}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ParamTypeError(f"{key} expects a list like [1, 2], got {short(value)}")
        return [coerce(v, item_type, f"{key}[]") for v in value]
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, str):
        return value
    if annotation is Any:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ParamTypeError(f"{key} expects {name}, got {short(value)}")


def check_value(key: str, value: Any, annotation: Any, meta: Param | None) -> Any:
    """`value` coerced to its type and checked: finite if a float, in the declared range."""
    value = coerce(value, annotation, key)
    items = value if isinstance(value, list) else [value]
    if not all(math.isfinite(v) for v in items if isinstance(v, float)):
        raise ParamError(f"{key} = {short(value)} is not allowed: use a finite number")
    if meta is not None and not meta.admits(value):
        raise ParamError(f"{key} = {short(value)} is not allowed: {meta.describe()}")
    return value


def checked(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every declared field of `cls` from `values` (defaults for the rest), coerced and checked;
    keys `cls` does not declare are refused in one line naming those it does. A `preset` key
    fills in, from the class's PRESETS, every field `values` leaves out."""
    fields = declared(cls)
    values = dict(values)
    named = values.pop("preset", None)
    if named is not None:
        choices = presets(cls)
        if named not in choices:
            allowed = f"use one of {', '.join(choices)}" if choices else "it has no presets"
            raise ParamError(f"{prefix}preset = {short(named)} is not allowed: {allowed}")
        values = {**choices[named], **values}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ParamError(unknown_message(prefix, unknown[0], fields, presets(cls)))
    out = defaults(cls)
    for name, value in values.items():
        out[name] = check_value(f"{prefix}{name}", value, *fields[name])
    return out


def unknown_message(prefix: str, key: str, fields: Iterable[str], named: Mapping) -> str:
    """One line: `prefix+key` is no parameter of the section; the ones it has."""
    takes = ", ".join(fields) or "no parameters"
    extra = f" (and preset: {', '.join(named)})" if named else ""
    if not prefix:
        return f"unknown parameter {key!r}: it takes {takes}{extra}"
    return f"unknown config key '{prefix}{key}': {prefix.rstrip('.')} takes {takes}{extra}"


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of the params dataclass `cls` from `values` (see `checked`)."""
    return cls(**checked(cls, values, prefix))


class Params:
    """Base of a params dataclass that checks itself: constructing one with a value outside its
    declaration raises `ParamError` (ints given for floats become floats)."""

    def __post_init__(self) -> None:
        for name, (annotation, meta) in declared(type(self)).items():
            value = check_value(name, getattr(self, name), annotation, meta)
            object.__setattr__(self, name, value)
