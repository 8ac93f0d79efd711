"""Device twin documents: desired and reported sections, each with its own ``$version``.

Patches follow JSON merge-patch rules as the hub applies them: nested objects merge, ``null`` deletes a key.
Both versions start at 1, as on a freshly created hub identity.
"""
from __future__ import annotations

import copy
from typing import Any, Dict


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
        merge_patch(self.reported, _without_metadata(patch))
        self.reported_version += 1
        return self.reported_version

    def patch_desired(self, patch: Dict[str, Any]) -> int:
        merge_patch(self.desired, _without_metadata(patch))
        self.desired_version += 1
        return self.desired_version


def _without_metadata(patch: Dict[str, Any]) -> Dict[str, Any]:
    # "$version" and "$metadata" are the hub's own keys; a patch cannot set them.
    return {k: v for k, v in patch.items() if not k.startswith("$")}
