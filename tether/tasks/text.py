"""What text a dataset row may carry: valid Unicode without NUL bytes (whatever the model), and,
when the model is known, only characters its tokenizer can encode.

``text_problem(text)`` checks the first; a ``TextCheck`` (for the built-in model,
``CharTokenizer().check``) the second. Both return the problem as a message, or None.
"""

from __future__ import annotations

import re
from collections.abc import Callable

TextCheck = Callable[[str], "str | None"]
"""``check(text) -> message | None``: why the model's tokenizer cannot encode ``text``."""

_BAD = re.compile("[\x00\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """A NUL byte or a lone surrogate (not valid Unicode: it cannot even be written as UTF-8)."""
    m = _BAD.search(text)
    if m is None:
        return None
    if m.group() == "\x00":
        return f"contains a NUL byte at position {m.start()}"
    return f"contains a lone surrogate U+{ord(m.group()):04X} at position {m.start()} (not valid Unicode text)"
