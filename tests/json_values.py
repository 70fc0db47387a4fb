"""Hypothesis strategies for JSON-like values, shared by the canonical-encoding tests."""

from __future__ import annotations

from hypothesis import strategies as st

# More than orjson writes as the Python encoders do: floats, ints beyond 64 bits, tuples,
# decimals of any exponent, control characters, and keys at and above U+E000 (where UTF-16
# order and code point order differ).
_ODD_TEXT = st.sampled_from(["a", "\x00", "\x1f", "\x7f", '"', "\\", "é", "\ue000", "\uffff", "😀"])

any_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=_ODD_TEXT)
)
any_values = st.recursive(
    any_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(alphabet=_ODD_TEXT, max_size=3), children, max_size=4)
    ),
    max_leaves=20,
)
