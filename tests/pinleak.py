"""What the PIN property tests share: random PINs and the "no 3 characters of the PIN" check.

A random PIN can share three characters with the words of a message by chance ("key", "lab"), which
says nothing about a leak. So each test first runs its scenario once with a PIN of non-ASCII letters
(:data:`SENTINEL`) and keeps every 3-character piece of the text that produced (:func:`vocabulary`);
random PINs are then drawn with none of those pieces (:func:`pins`), and any piece of the PIN that
shows up afterwards came from the PIN.
"""
from __future__ import annotations

from typing import Iterable, Set

from hypothesis import strategies as st

SENTINEL = "ÄÖÜßäöüÄÖÜß"
SPECIAL = list(";&?%=/ #")
PRINTABLE = [chr(c) for c in range(32, 127)]


def grams(text: str, n: int = 3) -> Set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def vocabulary(texts: Iterable[str]) -> Set[str]:
    out: Set[str] = set()
    for text in texts:
        out |= grams(text)
    return out


def pins(vocab: Set[str] = frozenset(), min_size: int = 4, max_size: int = 24):
    """Printable-ASCII PINs, rich in ``;&?%=/ #`` and spaces, sharing no 3 characters with ``vocab``."""
    chars = st.one_of(st.sampled_from(SPECIAL), st.sampled_from(PRINTABLE))
    return (st.lists(chars, min_size=min_size, max_size=max_size).map("".join)
            .filter(lambda p: not (grams(p) & vocab)))


def leaks(pin: str, texts: Iterable[str]) -> Set[str]:
    """The 3-character pieces of ``pin`` found in any of ``texts``."""
    found = set()
    pieces = grams(pin)
    for text in texts:
        found |= {g for g in pieces if g in text}
    return found
