"""Reading a data table as written: every value a string, nothing parsed, dropped or renamed on the way.

pandas' defaults turn `""`, `NA`, `None`, `null`, `NaN` ... into missing values (so rows vanish later) and texts
that look like numbers into floats (`0070` -> 70.0, `3.100` -> 3.1). Here CSV/TSV go through Python's csv module
and JSON through `json` with numbers kept as their text, so a cell is exactly the characters in the file. Each row
keeps where it came from (the line of a CSV/TSV/JSONL file, the record of a JSON array, the row of a Parquet
file), so later messages can name it. A JSON null or a Parquet null is an empty string: `pipeline/data.py`
decides what an empty value means.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cachetune.cache.errors import InputError

READABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
CANDIDATE_DELIMITERS = (",", ";", "\t", "|")
csv.field_size_limit(2**31 - 1)  # a long text is one field; the module's default stops at 131,072 characters


@dataclass
class Table:
    """A table's columns as lists of strings, and where each row is in the file."""

    path: Path
    columns: dict[str, list[str]]
    lines: list[int]  # per row: its 1-based line (CSV/TSV/JSONL), record (JSON) or row (Parquet)
    unit: str  # "line", "record" or "row": what `lines` counts

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, positions, limit: int = 5) -> str:
        """'data.csv lines 4, 9, 12 and 3 more' for the rows at `positions`."""
        positions = list(positions)
        shown = ", ".join(str(self.lines[p]) for p in positions[:limit])
        more = f" and {len(positions) - limit} more" if len(positions) > limit else ""
        return f"{self.path.name} {self.unit}{'s' if len(positions) > 1 else ''} {shown}{more}"

    def frame(self):
        """A pandas DataFrame of the string columns (object dtype)."""
        import pandas as pd

        return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in self.columns.items()})


def parse_delimiter(text: str | None) -> str | None:
    """--delimiter: one character, or `tab` / `\\t`."""
    if text is None:
        return None
    if text in ("tab", "\\t", "\t"):
        return "\t"
    if len(text) != 1:
        raise InputError(f"--delimiter {text!r}: give one character, e.g. ';' or tab")
    return text


def read_table(path: Path, delimiter: str | None = None, log=None) -> Table:
    """A .csv/.tsv/.jsonl/.json/.parquet file as strings. Raises InputError naming the line of a fault.

    delimiter: for CSV/TSV; None reads `,` (.csv) or tab (.tsv), unless the header has no such delimiter and
    another (`;`, tab, `|`, `,`) splits it into columns: then that one is used and `log` says so.
    """
    suffix = path.suffix.lower()
    if suffix not in READABLE_SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(READABLE_SUFFIXES)}")
    if suffix == ".parquet":
        return _read_parquet(path)
    text = _read_text(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, text, delimiter, "\t" if suffix == ".tsv" else ",", log)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return _read_json(path, text)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"{path} line {line} is not UTF-8 (byte {data[error.start]:#04x}); save the file as UTF-8") from None


def _records(path: Path, text: str, delimiter: str):
    """(start line, fields) per record; blank lines are skipped. A quoted field may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    previous = 0
    try:
        for fields in reader:
            start, previous = previous + 1, reader.line_num
            if len(fields) > 1 or (fields and fields[0].strip()):
                yield start, fields
    except csv.Error as error:
        raise InputError(f"{path} line {reader.line_num}: {error}; check its quoting"
                         f"{_other_delimiter_hint(text, delimiter)}") from None


def _detect(path: Path, text: str, default: str, log) -> str:
    """The default delimiter, or another one that splits a header the default leaves whole."""
    first = next(_records(path, text, default), None)
    if first is None or len(first[1]) > 1:
        return default
    for candidate in CANDIDATE_DELIMITERS:
        header = next(_records(path, text, candidate), (0, []))[1]
        if candidate != default and len(header) > 1:
            if log:
                log(f"note: {path.name} has no {DELIMITER_NAMES[default]} in its header but splits on "
                    f"{candidate!r}: reading it as {DELIMITER_NAMES[candidate]}-delimited (--delimiter sets it)")
            return candidate
    return default


def _read_delimited(path: Path, text: str, delimiter: str | None, default: str, log) -> Table:
    chosen = delimiter or _detect(path, text, default, log)
    records = _records(path, text, chosen)
    try:
        header_line, header = next(records)
        rows, lines = [], []
        for line, fields in records:
            if len(fields) > len(header):
                raise InputError(f"{path} line {line} has {len(fields)} fields but the header (line {header_line}) "
                                 f"has {len(header)}; quote fields that contain {chosen!r}"
                                 f"{_other_delimiter_hint(text, chosen)}")
            rows.append(fields + [""] * (len(header) - len(fields)))  # a short row: its missing cells are empty
            lines.append(line)
    except StopIteration:
        header, rows, lines = [], [], []
    names = [name.strip() for name in header]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"{path}: the header names column {duplicates[0]!r} twice; rename one")
    columns = {name: [row[i] for row in rows] for i, name in enumerate(names)}
    return Table(path, columns, lines, "line")


def _other_delimiter_hint(text: str, used: str) -> str:
    header = text.split("\n", 1)[0]
    for candidate in CANDIDATE_DELIMITERS:
        if candidate != used and candidate in header:
            return f", or if the file is {DELIMITER_NAMES[candidate]}-delimited pass --delimiter {candidate!r}"
    return ""


def _as_text(value) -> str:
    """A JSON or Parquet cell as its text: null/NaN -> '', true -> 'true', numbers as written (kept as text)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return ""
    except ImportError:
        pass
    return str(value)


def _loads(text: str):
    # Numbers stay the characters written (0070 is not valid JSON, but "3.100" as a number keeps its zeros).
    return json.loads(text, parse_float=str, parse_int=str, parse_constant=str)


def _columns_of(records: list[dict]) -> dict[str, list[str]]:
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return {name: [_as_text(record.get(name)) for record in records] for name in names}


def _read_jsonl(path: Path, text: str) -> Table:
    records, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = _loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path} line {number} is not valid JSON ({error.msg} at column {error.colno}); "
                             "fix that line (JSONL: one JSON object per line)") from None
        if not isinstance(record, dict):
            raise InputError(f"{path} line {number} is a JSON {type(record).__name__}, not an object; "
                             "JSONL needs one object per line, e.g. {\"text\": \"...\", \"label\": \"...\"}")
        records.append(record)
        lines.append(number)
    return Table(path, _columns_of(records), lines, "line")


def _read_json(path: Path, text: str) -> Table:
    try:
        data = _loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} line {error.lineno} is not valid JSON ({error.msg} at column {error.colno}); "
                         "fix it (or, for one object per line, name the file .jsonl)") from None
    if isinstance(data, dict) and data and all(isinstance(v, (dict, list)) for v in data.values()):
        # columns: {"text": [...], "label": [...]} or pandas' {"text": {"0": ...}, ...}
        columns = {name: list(v.values()) if isinstance(v, dict) else v for name, v in data.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise InputError(f"{path}: its columns have different lengths {sorted(lengths)}; give every column one "
                             "value per row")
        data = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise InputError(f"{path}: expected a JSON array of objects (or write one object per line as .jsonl)")
    return Table(path, _columns_of(data), list(range(1, len(data) + 1)), "record")


def _read_parquet(path: Path) -> Table:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises many types for a damaged file
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot read {path}: {message}; check the file is valid parquet") from None
    columns = {str(name): [_as_text(value) for value in frame[name].tolist()] for name in frame.columns}
    return Table(path, columns, list(range(1, len(frame) + 1)), "row")
