"""Labels that look alike written alike: 'café' in NFC and NFD, 'positive' and 'positive' + a zero-width space,
'very good' with a no-break space. Left as written they would be separate classes that print the same, and
`predict` could answer the lookalike. Each label is put in Unicode NFC, loses its format characters (category Cf:
zero-width spaces and joiners, the BOM, direction marks), has every space character (category Zs: no-break, thin,
ideographic) made a plain space, and loses surrounding whitespace. Lookalikes are merged, never refused: no
user means two classes that differ only in characters nobody can see. One line says what was changed.
"""
from __future__ import annotations

import unicodedata
from collections import Counter

SHOWN = 5  # changed labels named in the note


def normal_label(value: str) -> str:
    """The label as it is read: NFC, no format characters, every space a plain one, stripped."""
    value = unicodedata.normalize("NFC", value)
    value = "".join(" " if unicodedata.category(c) == "Zs" else c for c in value
                    if unicodedata.category(c) != "Cf")
    return value.strip()


def normal_labels(values: list[str], where: str, log) -> list[str]:
    """The labels normalised (see the module); `log` gets one note naming the changed ones and their rows' count,
    unless a change is only surrounding spaces ('positive ' is 'positive' without a note, as before)."""
    normal = [normal_label(v) for v in values]
    changed = Counter((v, n) for v, n in zip(values, normal) if v.strip() != n)
    if changed:
        shown = ", ".join(f"{v.strip()!a} -> {n!r} ({count} row{'s' if count > 1 else ''})"
                          for (v, n), count in changed.most_common(SHOWN))
        more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        spellings: dict[str, set] = {}
        for value, name in zip(values, normal):
            spellings.setdefault(name, set()).add(value.strip())
        merged = [name for name, written in spellings.items() if len(written) > 1]
        into = f"; each of {', '.join(map(repr, merged))} was written more than one way, now one class" if merged else ""
        log(f"note: {where}: {sum(changed.values())} labels normalised (Unicode NFC, invisible characters dropped, "
            f"special spaces made plain): {shown}{more}{into}")
    return normal
