"""Progress of long operations on stderr: bars with rate and ETA (tqdm; widgets in a notebook) and one-line notes.

Every long operation of the library (training and its final evaluation, the attack suite, corruptions, CKA, LSC,
minimum perturbations, the gallery) takes ``progress: bool``; ``False`` makes it silent. Results never go to
stderr, so a caller that pipes stdout keeps only the results.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, progress: bool = True,
        leave: bool = False, unit: str = "it") -> tqdm:
    """A bar over ``iterable`` (or updated by hand up to ``total``) with its count, rate and ETA; a silent
    pass-through when ``progress`` is False. ``leave`` keeps the finished bar on screen (outer loops)."""
    return tqdm(iterable, total=total, desc=desc, disable=not progress, leave=leave, unit=unit, dynamic_ncols=True,
                file=sys.stderr)


def note(text: str, progress: bool = True) -> None:
    """One line on stderr, printed above any running bar (nothing when ``progress`` is False)."""
    if progress:
        tqdm.write(text, file=sys.stderr)
