"""Module output -> module input routing, as IoT Edge's hub does it (reference §11.2), with Edge's route
syntax::

    FROM /messages/modules/filter/outputs/alerts INTO BrokeredEndpoint("/modules/logger/inputs/in1")
    FROM /messages/modules/filter/outputs/* INTO BrokeredEndpoint("/modules/logger/inputs/all")
    FROM /messages/* INTO BrokeredEndpoint("/modules/logger/inputs/everything")

A module sends on an output by putting ``$.on={output}`` in its telemetry bag; every matching route
delivers a copy, within the same device, to ``devices/{device}/modules/{target}/inputs/{input}/{bag}`` at
QoS 1 with the message's properties plus ``$.cdid``/``$.cmid`` (the sending device and module), as Edge
does. The message also stays in the hub's telemetry (``$upstream``). ``WHERE`` conditions are not
supported (a named error). Unlike Edge, which stores messages for an offline module, a route whose target
is offline or not subscribed to its inputs drops the copy and records ``routing.undelivered``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .errors import EmulatorError

_ROUTE = re.compile(
    r'^\s*FROM\s+/messages/(?:\*|modules/(?P<module>[^/\s]+)/(?:\*|outputs/(?P<output>[^/\s]+)))\s+'
    r'INTO\s+BrokeredEndpoint\(\s*"/modules/(?P<target>[^/"\s]+)/inputs/(?P<input>[^/"\s]+)"\s*\)\s*$',
    re.IGNORECASE)


@dataclass(frozen=True)
class Route:
    text: str
    module: Optional[str]      # None: any module (and, for /messages/*, devices too)
    output: Optional[str]      # None: any output
    target_module: str
    target_input: str
    any_source: bool = False   # FROM /messages/*

    def matches(self, module_id: Optional[str], output: Optional[str]) -> bool:
        if self.any_source:
            return True
        if module_id is None or (self.module not in (None, "*") and self.module != module_id):
            return False
        return self.output in (None, "*") or self.output == output


def parse_route(text: str) -> Route:
    """An Edge route string -> Route; EmulatorError naming the expected syntax otherwise."""
    if re.search(r"\bWHERE\b", text, re.IGNORECASE):
        raise EmulatorError(f"route {text!r}: WHERE conditions are not supported by the emulator")
    match = _ROUTE.match(text)
    if match is None:
        raise EmulatorError(f"route {text!r} is not of the form 'FROM /messages/modules/{{module}}/outputs/"
                            f"{{output|*}} INTO BrokeredEndpoint(\"/modules/{{module}}/inputs/{{input}}\")' "
                            f"(or 'FROM /messages/* INTO …')")
    source = text.split()[1]
    return Route(text.strip(), match["module"], match["output"], match["target"], match["input"],
                 any_source=source == "/messages/*")


def targets(routes: List[Route], module_id: Optional[str], system: Dict[str, Optional[str]]
            ) -> List[Tuple[str, str]]:
    """(target module, input) for every route a message from ``module_id`` matches (each pair once)."""
    output = system.get("$.on")
    found: List[Tuple[str, str]] = []
    for route in routes:
        pair = (route.target_module, route.target_input)
        if route.matches(module_id, output) and pair not in found and pair[0] != module_id:
            found.append(pair)
    return found


def input_pairs(device_id: str, module_id: Optional[str], system: Dict[str, Optional[str]],
                application: Dict[str, Optional[str]]) -> List[Tuple[str, Optional[str]]]:
    """The property bag a routed message carries to the target module's input."""
    pairs: List[Tuple[str, Optional[str]]] = [(k, v) for k, v in system.items() if k in ("$.mid", "$.cid", "$.ct", "$.ce")]
    pairs.append(("$.cdid", device_id))
    if module_id:
        pairs.append(("$.cmid", module_id))
    pairs.extend(application.items())
    return pairs
