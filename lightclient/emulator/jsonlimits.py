"""JSON with a bounded nesting depth, checked before parsing (pure; no I/O).

``json.loads`` recurses once per nesting level, so ``[[[[…]]]]`` a few thousand levels deep raises
RecursionError, which nothing expects; the twin code recurses again when it merges. The depth is therefore
measured on the text first, with the brackets inside strings ignored, and only shallow enough text is
parsed.

IoT Hub limits twin sections (tags, desired, reported) to 10 levels of objects below the section itself
("the maximum depth of JSON objects in tags, desired properties, and reported properties is 10"), so a
reported patch, whose root is the section, may nest 11 brackets deep.
"""
from __future__ import annotations

import json
import re
from typing import Any, Union

#: Levels of objects allowed below a twin section (desired, reported, tags), as in IoT Hub.
MAX_TWIN_DEPTH = 10
#: Nesting allowed in any other JSON the emulator parses (service bodies, method payloads, DPS bodies):
#: far deeper than any real document, far shallower than the interpreter's recursion limit.
MAX_JSON_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_BSTRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BBRACKET = re.compile(rb"[\[\]{}]")


class JsonTooDeep(ValueError):
    """The JSON text nests deeper than allowed (``depth`` levels, ``limit`` allowed)."""

    def __init__(self, depth: int, limit: int):
        super().__init__(f"JSON nested {depth} levels deep; at most {limit} allowed")
        self.depth = depth
        self.limit = limit


def nesting(text: Union[str, bytes]) -> int:
    """The deepest nesting of objects and arrays in ``text`` (``{}`` is 1, ``{"a": [1]}`` is 2).

    Meant for text about to be parsed: for invalid JSON the answer is only an estimate."""
    if isinstance(text, (bytes, bytearray)):
        strings, brackets, opening = _BSTRING, _BBRACKET, (b"{", b"[")
    else:
        strings, brackets, opening = _STRING, _BRACKET, ("{", "[")
    depth = deepest = 0
    for match in brackets.finditer(strings.sub(b"" if opening[0] == b"{" else "", text)):
        if match.group() in opening:
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(text: Union[str, bytes], max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that raises JsonTooDeep (a ValueError) instead of recursing past ``max_depth``."""
    depth = nesting(text)
    if depth > max_depth:
        raise JsonTooDeep(depth, max_depth)
    return json.loads(text)


def depth_of(value: Any, stop_above: int = MAX_JSON_DEPTH) -> int:
    """Nesting of objects and arrays in a Python value (``{}`` is 1), without recursion; the walk stops
    once it is deeper than ``stop_above`` (so a dict that contains itself ends too)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > stop_above:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest
