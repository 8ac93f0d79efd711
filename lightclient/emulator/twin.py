"""Device twin documents: desired and reported sections, each with its own ``$version``.

Patches follow JSON merge-patch rules as the hub applies them: nested objects merge, ``null`` deletes a key.
Both versions start at 1, as on a freshly created hub identity. As on the hub, a section (desired,
reported) holds at most 32 KB counted the hub's way (:func:`section_size`); a patch that would make it
larger is refused whole, so a device adding keys forever cannot grow the emulator without end.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

#: IoT Hub's limit for each of properties/desired and properties/reported.
MAX_SECTION_BYTES = 32 * 1024


class TwinTooLarge(ValueError):
    """A patch would take a twin section over MAX_SECTION_BYTES; nothing was changed."""


def section_size(section: Dict[str, Any]) -> int:
    """The size IoT Hub counts for a twin section: for every property the UTF-8 length of its key plus its
    value's size (a string its UTF-8 length, a number 8, a boolean 4, an object or array the sum of what it
    holds); the hub's own ``$`` keys are not counted."""
    total = 0
    stack = [section]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if not key.startswith("$"):
                    total += len(key.encode("utf-8", "surrogatepass"))
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, bool):
            total += 4
        elif isinstance(item, (int, float)):
            total += 8
    return total


def merge_patch(target: Dict[str, Any], patch: Dict[str, Any]) -> None:
    """Apply ``patch`` to ``target`` in place: null deletes, objects merge recursively."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            merge_patch(child, value)
        else:
            target[key] = copy.deepcopy(value)


class Twin:
    def __init__(self) -> None:
        self.desired: Dict[str, Any] = {}
        self.reported: Dict[str, Any] = {}
        self.desired_version = 1
        self.reported_version = 1

    def document(self) -> Dict[str, Any]:
        """The body of a twin GET response: ``{"desired": {…, "$version": n}, "reported": {…}}``."""
        return {
            "desired": {**copy.deepcopy(self.desired), "$version": self.desired_version},
            "reported": {**copy.deepcopy(self.reported), "$version": self.reported_version},
        }

    def patch_reported(self, patch: Dict[str, Any]) -> int:
        """Merge ``patch``; raises TwinTooLarge (the section unchanged) if it would exceed the limit."""
        self.reported = _merged(self.reported, patch, "reported")
        self.reported_version += 1
        return self.reported_version

    def patch_desired(self, patch: Dict[str, Any]) -> int:
        """Merge ``patch``; raises TwinTooLarge (the section unchanged) if it would exceed the limit."""
        self.desired = _merged(self.desired, patch, "desired")
        self.desired_version += 1
        return self.desired_version


def _merged(section: Dict[str, Any], patch: Dict[str, Any], name: str) -> Dict[str, Any]:
    result = copy.deepcopy(section)
    merge_patch(result, _without_metadata(patch))
    size = section_size(result)
    if size > MAX_SECTION_BYTES:
        raise TwinTooLarge(f"the patch would make the {name} properties {size} bytes; IoT Hub allows "
                           f"{MAX_SECTION_BYTES}")
    return result


def _without_metadata(patch: Dict[str, Any]) -> Dict[str, Any]:
    # "$version" and "$metadata" are the hub's own keys; a patch cannot set them.
    return {k: v for k, v in patch.items() if not k.startswith("$")}
