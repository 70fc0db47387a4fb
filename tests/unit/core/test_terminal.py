"""shown(): what a terminal receives of text that callers chose."""

from __future__ import annotations

from sidecar.terminal import shown


def test_printable_text_is_unchanged() -> None:
    assert shown("refund T-1 für 10 € — ok") == "refund T-1 für 10 € — ok"


def test_controls_and_separators_are_escaped() -> None:
    assert shown("a\x1b[2Jb\nc\rd\te\x7f\u2028\x00") == "a\\x1b[2Jb\\nc\\rd\\te\\x7f\\u2028\\x00"
    assert shown("a\x1b[2Jb\nc").isprintable()
