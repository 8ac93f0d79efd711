"""The one RFC 7512 ``pkcs11:`` URI parser, shared by key parsing and redaction.

RFC 7512 splits path attributes on ``;`` and query attributes on ``&``; values are percent-encoded.
A PIN written into a URI by hand is often not encoded (``pin-value=12;34``, ``pin-value=a&b``), so
the ``pin-value`` attribute is read more generously than the rest: its value runs up to the next
separator that starts another attribute (a name and ``=``: ``;object=``, ``&module-path=`` …), else
to the end of the text; ``pin-value=12;34`` is the PIN ``12;34``. Parsing and :func:`redact` use that same rule, so whatever the parser takes as the PIN is
exactly what redaction hides, and in doubt more is hidden, never less.

Error messages built here never quote anything from a URI that carries a ``pin-value``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple
from urllib.parse import unquote, unquote_to_bytes

from .exceptions import ConfigError

SCHEME = "pkcs11:"
REDACTED = "***"

# Where a pin-value may end: a separator followed by an attribute, i.e. a name and '='.
_ATTR_START = re.compile(r"[A-Za-z][A-Za-z0-9-]*=")
_PIN_VALUE = re.compile(r"pin-value=", re.IGNORECASE)
_SCHEME_RE = re.compile(re.escape(SCHEME), re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")

PATH, QUERY = "path", "query"


def _separators(section: str) -> str:
    return ";?" if section == PATH else "&"


def _find_any(text: str, chars: str, start: int) -> int:
    hits = [i for i in (text.find(c, start) for c in chars) if i >= 0]
    return min(hits) if hits else len(text)


def pin_value_end(text: str, start: int, section: str) -> int:
    """Where the pin-value whose value starts at ``start`` ends: see the module docstring."""
    seps = _separators(section)
    k = start
    while True:
        k = _find_any(text, seps, k)
        if k >= len(text) or _ATTR_START.match(text, k + 1):
            return k
        k += 1


def _items(body: str) -> Iterator[Tuple[str, str]]:
    """(section, raw item) for each attribute of a URI body (the text after ``pkcs11:``)."""
    section, i, n = PATH, 0, len(body)
    while i <= n:
        if _PIN_VALUE.match(body, i):
            j = pin_value_end(body, i + len("pin-value="), section)
        else:
            j = _find_any(body, _separators(section), i)
        yield section, body[i:j]
        if j >= n:
            return
        if section == PATH and body[j] == "?":
            section = QUERY
        i = j + 1


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI. Values stay percent-encoded as written; the PIN never shows."""

    path: Tuple[Tuple[str, str], ...]           # (name, raw value), without pin-value/pin-source
    query: Tuple[Tuple[str, str], ...]          # (name, raw value), without pin-*/module-path
    module_path: Optional[str] = None           # decoded
    pin_source: Optional[str] = None            # decoded
    pin_value: Optional[str] = field(default=None, repr=False)   # decoded
    redacted: str = ""

    def attribute(self, name: str) -> Optional[str]:
        """The percent-decoded value of path attribute ``name`` (the first one), or None."""
        raw = self.raw_attribute(name)
        return unquote(raw) if raw is not None else None

    def attribute_bytes(self, name: str) -> Optional[bytes]:
        """Like :meth:`attribute`, as bytes (for ``id``, which is binary)."""
        raw = self.raw_attribute(name)
        return unquote_to_bytes(raw) if raw is not None else None

    def raw_attribute(self, name: str) -> Optional[str]:
        return next((v for n, v in self.path if n == name), None)

    def uri(self) -> str:
        """The URI without its PIN and module path, as handed to OpenSSL."""
        text = SCHEME + ";".join(f"{n}={v}" for n, v in self.path)
        if self.query:
            text += "?" + "&".join(f"{n}={v}" for n, v in self.query)
        return text


def _shown(uri: str, item: str) -> str:
    """``item`` quoted for an error message, unless the URI carries a PIN that it might contain."""
    if _PIN_VALUE.search(uri):
        return "(not shown: the URI carries a pin-value)"
    return repr(item)


def parse(uri: str) -> Pkcs11Uri:
    """Split a ``pkcs11:`` URI into path and query attributes (RFC 7512); raises ConfigError if malformed."""
    if not uri[:len(SCHEME)].lower() == SCHEME:
        raise ConfigError("not a pkcs11: URI")
    path: List[Tuple[str, str]] = []
    query: List[Tuple[str, str]] = []
    pin_value = pin_source = module_path = None
    for section, item in _items(uri[len(SCHEME):]):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq or not _NAME.match(name):
            if section == QUERY:   # never quoted: any part of a query may be a mangled PIN
                raise ConfigError("malformed pkcs11: URI query attribute: expected name=value, "
                                  "e.g. ?module-path=/path/to/module.so (percent-encode '&' in values as %26)")
            raise ConfigError(
                f"malformed pkcs11: URI path attribute {_shown(uri, item)}: expected name=value, "
                "e.g. pkcs11:token=lab;object=devkey;type=private (percent-encode ';' in values as %3B)")
        lname = name.lower()
        if lname == "pin-value":        # in the query, or misplaced in the path: never forwarded
            pin_value = unquote(value)
        elif lname == "pin-source":
            pin_source = unquote(value)
        elif section == QUERY and name == "module-path":
            module_path = unquote(value)
        elif section == QUERY:
            query.append((name, value))
        else:
            path.append((name, value))
    return Pkcs11Uri(tuple(path), tuple(query), module_path=module_path, pin_source=pin_source,
                     pin_value=pin_value, redacted=redact(uri))


def _section_at(text: str, index: int) -> str:
    """PATH or QUERY for a position in free text: after a '?' that follows the nearest 'pkcs11:'."""
    start = None
    for m in _SCHEME_RE.finditer(text, 0, index):
        start = m.end()
    if start is None:
        return QUERY
    return QUERY if "?" in text[start:index] else PATH


def redact(text: str) -> str:
    """``text`` with the value of every ``pin-value=`` replaced by ``***``.

    For a whole URI this hides exactly what :func:`parse` takes as the PIN. In free text the end of a
    URI is not knowable (a PIN may hold spaces), so a value runs to the end of the text unless a known
    attribute follows it.
    """
    out: List[str] = []
    pos = 0
    for m in _PIN_VALUE.finditer(text):
        if m.start() < pos:      # inside a value already hidden
            continue
        end = pin_value_end(text, m.end(), _section_at(text, m.start()))
        out += [text[pos:m.end()], REDACTED]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def pin_values(text: str) -> Tuple[str, ...]:
    """Every pin-value in ``text``, raw and percent-decoded (to scrub them from OpenSSL's messages)."""
    found = []
    for m in _PIN_VALUE.finditer(text):
        end = pin_value_end(text, m.end(), _section_at(text, m.start()))
        raw = text[m.end():end]
        if raw:
            found += [raw, unquote(raw)]
    return tuple(found)
