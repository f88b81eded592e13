"""Typed config building blocks: an error that names its field, dataclasses that refuse misspelt
fields, and the kinds of field a run treats specially (``resumable``, ``run_time``). No project
imports, so any module may use them."""

from __future__ import annotations

import dataclasses
import math


def resumable(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, run_time: bool = False):
    """A field (or a whole section) a resumed run may change: it decides how the run computes,
    lays out or reports, not what its checkpoint holds. ``run_time``: the program resolves the
    value for the backend it runs on (``"auto"`` -> a kernel); a run's saved config keeps the
    value as it was asked for."""
    metadata = {"resumable": True, "run_time": run_time}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def formerly(default, name: str):
    """A field that configs saved before it moved called ``name`` (a flat field of the section that
    held it); the run's one translation of saved configs reads this (``train.core.config.upgrade``)."""
    return dataclasses.field(default=default, metadata={"formerly": name})


def flagged_keys(obj, flag: str, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of ``obj``'s fields (nested dataclasses walked) whose metadata sets ``flag``; a
    flagged section gives its prefix ("checkpoint.")."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(flag):
            out.append(f"{prefix}{f.name}." if dataclasses.is_dataclass(value) else f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(value):
            out.extend(flagged_keys(value, flag, f"{prefix}{f.name}."))
    return tuple(out)


class FieldError(ValueError):
    """An invalid config field: ``owner.field=value: why`` (``field`` and ``why`` kept apart)."""

    def __init__(self, owner: str, field: str, value, why: str):
        self.field, self.value, self.why = field, value, why
        super().__init__(f"{owner}.{field}={value!r}: {why}")


class StrictFields:
    """A dataclass that refuses attributes it does not declare, so that a misspelt field in a
    config file (``cfg.train.step = 5``) is an error instead of a silent no-op."""

    def __setattr__(self, name, value):
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            import difflib

            moved = self.moved().get(name)
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (it is {' and '.join(moved)} now)" if moved else f" (did you mean {close[0]!r}?)" if close else ""
            raise AttributeError(f"{type(self).__name__} has no field {name!r}{hint}")
        object.__setattr__(self, name, value)

    @classmethod
    def moved(cls) -> dict[str, tuple[str, ...]]:
        """Fields this section had once -> where they are now (dotted, relative to the section)."""
        return {}

    def _check_part(self, name: str, part) -> None:
        """``part.check()``, its ``FieldError`` named as this section's field ``name.field`` (``name``
        empty: the part's own field name)."""
        try:
            part.check()
        except FieldError as e:
            raise FieldError(type(self).__name__, f"{name}.{e.field}" if name else e.field, e.value, e.why) from None

    def _fail(self, name: str, why: str):
        raise FieldError(type(self).__name__, name, getattr(self, name), why)

    def _choose(self, name: str, choices) -> None:
        """``FieldError`` unless field ``name`` is one of ``choices``."""
        if getattr(self, name) not in choices:
            self._fail(name, f"choose one of {', '.join(choices)}")


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_finite(value) -> bool:
    return finite(value) and value > 0
