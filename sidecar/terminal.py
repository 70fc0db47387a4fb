"""Text from callers, made safe to print on a terminal.

Agents choose run metadata, argument keys and values; an audit trace or a decision printed
for a person must not let them move the cursor, rewrite earlier lines or forge new ones.
"""

from __future__ import annotations


def shown(text: str) -> str:
    """``text`` with every non-printable character (controls, line and paragraph separators,
    escape sequences' ESC) written as its Python escape, ``\\x1b``; printable text unchanged."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
