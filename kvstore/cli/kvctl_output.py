"""Output helpers of ``kvctl``: one JSON schema for every command, tables, sizes, progress bars.

JSON schema (every command): a JSON object; protobuf messages become objects with every field
present; integers stay integers, floats floats; ``bytes`` (namespace ids, keys) become
lower-case hex; enums become their lower-case name (``"dram"``, ``"float16"``), ``null`` for
``*_UNSPECIFIED``; repeated fields become lists, maps objects; an unset message field is ``null``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from google.protobuf.descriptor import FieldDescriptor

#: Seconds between two redraws of a progress bar.
REDRAW_S = 0.1
BAR_WIDTH = 30


def enum_name(field: FieldDescriptor, number: int) -> str | int | None:
    v = field.enum_type.values_by_number.get(number)
    if v is None:
        return number          # a value newer than this kvctl: still typed
    return None if v.name.endswith("_UNSPECIFIED") else v.name.lower()


def _value(field: FieldDescriptor, v: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(v)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_name(field, v)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes(v).hex()
    return v


def _repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)     # protobuf >= 6; ``label`` before
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def to_json(msg) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict following the schema above."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        v = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(v)   # map<string, scalar>: a JSON object
        elif _repeated(field):
            out[field.name] = [_value(field, x) for x in v]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, v)
    return out


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal (scripts see nothing)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self._label, self.total = label, total
        self._stream = stream or sys.stderr
        self._on = self._stream.isatty()
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        if not self._on or (now - self._last < REDRAW_S and done < self.total):
            return
        self._last = now
        frac = done / self.total if self.total else 1.0
        fill = int(BAR_WIDTH * min(frac, 1.0))
        self._stream.write(f"\r{self._label} [{'#' * fill}{'.' * (BAR_WIDTH - fill)}] {done}/{self.total} {note}\x1b[K")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
