"""Regression targets read from table cells, in the number format the user names.

Without --decimal-mark a target is a number as Python writes it (4.25, -3, 1e-5). Tables from spreadsheets
often hold 4,25 (a decimal comma), 1,197.45 or 1.197,45 (thousands grouped): those are refused with the
--decimal-mark that reads them, never guessed, since 1,197 is 1197 in one convention and 1.197 in the other.
With --decimal-mark ',' (or '.') that mark is the decimal point and the other one, or a space, groups thousands
in threes.
"""
from __future__ import annotations

import re

import numpy as np
from cachetune.cache.errors import InputError

DECIMAL_MARKS = (".", ",")
SPACES = " \u00a0\u202f"  # a space, no-break space and narrow no-break space group thousands in either convention


def _grouped(mark: str) -> re.Pattern:
    group = re.escape(("," if mark == "." else ".") + SPACES)
    return re.compile(rf"[+-]?(\d{{1,3}}([{group}]\d{{3}})+|\d+)({re.escape(mark)}\d+)?|[+-]?{re.escape(mark)}\d+")


GROUPED = {mark: _grouped(mark) for mark in DECIMAL_MARKS}


def read_number(value: str, mark: str | None) -> float:
    """The number in `value`; mark None: Python's float syntax; '.' or ',': that decimal mark, the other one (or a
    space) grouping thousands. Raises ValueError when it is not a number in that format."""
    if mark is None:
        return float(value)
    text = value.strip()
    if GROUPED[mark].fullmatch(text):
        return float(re.sub(f"[{re.escape(',.' + SPACES)}]", lambda m: "." if m.group() == mark else "", text))
    if "," not in text and (mark == "." or "." not in text):  # 12, -3, 1e-5, 1.5e3 (a point decimal)
        return float(text)
    raise ValueError(value)


def read_targets(source, column: str, raw: list[str], origin, decimal_mark: str | None = None, log=None) -> np.ndarray:
    """Regression targets [N] float32. InputError (with the rows) for text that is not a number in the format,
    naming the --decimal-mark that reads it when one does, and for a non-finite target (inf, nan, beyond float32)."""
    numbers, not_numbers = np.zeros(len(raw), dtype=np.float64), []
    for i, value in enumerate(raw):
        try:
            numbers[i] = read_number(value, decimal_mark)
        except ValueError:
            not_numbers.append(i)
    if not_numbers:
        first = raw[not_numbers[0]]
        raise InputError(f"{source}: column {column!r} is not numeric ({first!r} at {origin.where(not_numbers)}); "
                         + _format_fix([raw[i] for i in not_numbers], first, decimal_mark))
    bad = np.flatnonzero(~np.isfinite(numbers) | (np.abs(numbers) > np.finfo(np.float32).max))
    if bad.size:
        raise InputError(f"{source}: column {column!r} has non-finite targets ({raw[bad[0]]!r} at {origin.where(bad)}); "
                         "regression targets must be finite numbers within float32's range: fix or remove those rows")
    if decimal_mark is not None and log is not None:
        grouped = [i for i, value in enumerate(raw) if re.search(f"[{re.escape(',.' + SPACES)}]", value.strip())]
        if grouped:
            log(f"note: {source}: read {len(grouped)} targets of column {column!r} with {decimal_mark!r} as the decimal "
                f"mark (e.g. {raw[grouped[0]]!r} as {numbers[grouped[0]]:g})")
    return numbers.astype(np.float32)


def _format_fix(values: list[str], first: str, decimal_mark: str | None) -> str:
    """The fix for values that are not numbers: each --decimal-mark that reads every one of them, or the way out."""
    readers = [(mark, numbers[0]) for mark in DECIMAL_MARKS
               if mark != decimal_mark and (numbers := _read_all(values, mark)) is not None]
    if readers:
        return ("the numbers are written with a decimal comma or thousands separators: "
                + " or ".join(f"--decimal-mark '{mark}' reads {first!r} as {number:g}" for mark, number in readers))
    format_ = f" with {decimal_mark!r} as the decimal mark" if decimal_mark else ""
    return f"regression needs numbers{format_} (or use --task classification)"


def _read_all(values: list[str], mark: str) -> list[float] | None:
    try:
        return [read_number(value, mark) for value in values]
    except ValueError:
        return None
