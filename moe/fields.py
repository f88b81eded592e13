"""Typed config building blocks: an error that names its field, and dataclasses that refuse
misspelt fields. No project imports, so any module may use them."""

from __future__ import annotations

import dataclasses


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

            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise AttributeError(f"{type(self).__name__} has no field {name!r}{hint}")
        object.__setattr__(self, name, value)

    def _fail(self, name: str, why: str):
        raise FieldError(type(self).__name__, name, getattr(self, name), why)
