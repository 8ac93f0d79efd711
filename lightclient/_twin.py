"""Desired-property bookkeeping for Device: JSON merge patches, and what changed while offline.

Pure. The hub sends desired changes only while a device is connected (``$iothub/twin/PATCH/properties/
desired/?$version=n``, body ``{"key": value, …, "$version": n}``, ``null`` deleting a key), so after a
reconnect the device reads the whole twin and works out the patch it missed: :func:`diff` of the desired
document it knew and the one it just read. Patches older than what the device already has are dropped,
which also keeps the callback in version order.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

_VERSION = "$version"


def _strip(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The document without its metadata (``$version``, ``$metadata``): only user properties."""
    return {k: v for k, v in doc.items() if not k.startswith("$")}


def merge_patch(doc: Dict[str, Any], patch: Dict[str, Any]) -> Dict[str, Any]:
    """Apply a twin patch (RFC 7386 merge-patch semantics: ``None`` deletes, objects merge) to a copy."""
    result = copy.deepcopy(doc)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def diff(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """The merge patch that turns ``old`` into ``new``: ``merge_patch(old, diff(old, new)) == new``."""
    patch: Dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = diff(old[key], value)
            if sub:
                patch[key] = sub
        elif old[key] != value or type(old[key]) is not type(value):
            patch[key] = copy.deepcopy(value)
    return patch


class DesiredState:
    """The desired properties a device has seen, and their ``$version``. Not thread-safe: one owner thread."""

    def __init__(self) -> None:
        self.doc: Optional[Dict[str, Any]] = None
        self.version: Optional[int] = None

    def apply(self, patch: Dict[str, Any], version: int) -> bool:
        """Take a received patch; False (and no change) if it is not newer than what is known."""
        if self.version is not None and version <= self.version:
            return False
        self.doc = merge_patch(self.doc or {}, _strip(patch))
        self.version = version
        return True

    def reconcile(self, desired: Dict[str, Any]) -> Optional[Tuple[Dict[str, Any], Optional[int]]]:
        """Take the ``desired`` section of a full twin; return ``(missed_patch, version)`` or None.

        The patch carries ``$version`` like one sent by the hub. None when the document is not newer,
        or nothing a user would notice changed. Before anything was known, the whole document is "missed".
        """
        version = desired.get(_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            version = None
        if self.version is not None and version is not None and version <= self.version:
            return None
        new_doc = _strip(desired)
        patch = diff(self.doc or {}, new_doc)
        self.doc = new_doc
        if version is not None:
            self.version = version
        if not patch:
            return None
        patch[_VERSION] = version
        return patch, version  # version is None only for a twin without $version (not seen from IoT Hub)


__all__ = ["DesiredState", "diff", "merge_patch"]
