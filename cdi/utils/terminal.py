"""Text from users' files, made safe to print on a terminal.

File names and captions are the user's (or an opponent's) data: an escape
sequence in a file name (``\\x1b[2J``, a hyperlink, a title change), a
right-to-left override or a line separator in a caption would otherwise
reach the terminal and rewrite, hide or reorder what the audit prints.
``printable`` shows every such character as a visible escape instead; it is
the one function the command line passes user strings through
(``console_text`` adds rich-markup escaping), and ``SanitisingFilter``
applies it to the ``cdi`` logger's warnings.
"""

from __future__ import annotations

import logging
import unicodedata

from rich.markup import escape

#: Unicode categories shown as escapes: controls, format characters (bidi
#: overrides, zero-width characters), line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: object, *, keep_newlines: bool = True) -> str:
    """``str(text)`` with every control or invisible formatting character written as an escape.

    ``"\\x1b[31m"`` becomes ``"\\\\x1b[31m"``, U+202E becomes ``"\\\\u202e"``;
    newlines stay when ``keep_newlines`` (messages are multi-line), tabs stay.
    Ordinary text, including accented letters and CJK, is unchanged.
    """
    out = []
    for char in str(text):
        if (char == "\n" and keep_newlines) or char == "\t":
            out.append(char)
        elif unicodedata.category(char) in _UNSAFE_CATEGORIES:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def console_text(text: object, *, keep_newlines: bool = True) -> str:
    """``printable`` text, escaped for rich markup: what ``console.print`` may be given."""
    return escape(printable(text, keep_newlines=keep_newlines))


class SanitisingFilter(logging.Filter):
    """A logging filter that passes each record's message through ``printable``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = printable(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


def sanitise_cdi_log() -> None:
    """Attach one ``SanitisingFilter`` to the ``cdi`` logger (idempotent)."""
    logger = logging.getLogger("cdi")
    if not any(isinstance(f, SanitisingFilter) for f in logger.filters):
        logger.addFilter(SanitisingFilter())
