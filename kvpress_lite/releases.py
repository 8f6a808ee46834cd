"""The transformers releases the conformance suite was run on, written in one place.

CI installs exactly these two (``make test`` the newest, ``.ci/run`` both); ``make
test-latest`` runs the suite on whatever transformers is newest and is the way a new release
gets onto this list. A press applied under a transformers newer than :data:`NEWEST_VERIFIED`
logs one warning per process naming the conformance suite, since its families were proven on
tiny models of an older release only.

>>> from kvpress_lite import releases
>>> releases.OLDEST_SUPPORTED, releases.NEWEST_VERIFIED          # doctest: +SKIP
('4.56.2', '5.25.0')
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

# The Makefile reads these two lines (sed): keep each a plain assignment of a quoted version.
OLDEST_SUPPORTED = "4.56.2"
NEWEST_VERIFIED = "5.25.0"

_warned = False


def version_tuple(version: str) -> tuple[int, ...]:
    """``"5.25.0.dev0"`` -> ``(5, 25, 0)``: the numeric release part of a version string.

    >>> version_tuple("5.25.0.dev0")
    (5, 25, 0)
    """
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a release version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def newer_than_verified(version: str) -> bool:
    """Whether ``version`` is a transformers release past the newest one the suite ran on.

    >>> newer_than_verified("99.0.0"), newer_than_verified(NEWEST_VERIFIED)
    (True, False)
    """
    return version_tuple(version) > version_tuple(NEWEST_VERIFIED)


def installed_version() -> str:
    """The installed transformers release."""
    import transformers

    return transformers.__version__


def warn_if_unverified() -> None:
    """Log once per process when the installed transformers is newer than :data:`NEWEST_VERIFIED`."""
    global _warned
    if _warned:
        return
    installed = installed_version()
    if newer_than_verified(installed):
        _warned = True
        logger.warning(
            "kvpress-lite: transformers %s is newer than the newest release kvpress-lite was verified on (%s); "
            "families may have changed. Check your model on it with `kvpress-lite verify MODEL` (or "
            "`kvl.verify(model)`), or run the whole conformance suite (`make test-latest` in a kvpress-lite "
            "checkout), before trusting the press on this release.",
            installed, NEWEST_VERIFIED,
        )
