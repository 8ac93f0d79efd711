"""IoT Plug and Play conventions on top of the twin and methods. Pure: builds JSON-ready dicts.

* The model id goes in the MQTT username: ``Identity(…, model_id="dtmi:com:example:Thermostat;1")``.
* Component telemetry carries ``$.sub``: ``device.send(body, component="thermostat1")``.
* Component commands arrive as the method name ``"thermostat1*getMaxMinReport"`` (:func:`split_command`).
* Writable properties are acknowledged in reported properties (:func:`writable_property_ack`); component
  properties sit under the component name with the marker ``"__t": "c"`` (:func:`component_properties`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .exceptions import ConfigError

#: The marker IoT Plug and Play puts in a component's section of the twin.
COMPONENT_MARKER = {"__t": "c"}


def _name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty str, not {value!r}")
    return value


def component_properties(component: str, properties: Dict[str, Any]) -> Dict[str, Any]:
    """``component_properties("thermostat1", {"maxTemp": 30})`` ->
    ``{"thermostat1": {"__t": "c", "maxTemp": 30}}`` (a reported patch for a component)."""
    if not isinstance(properties, dict):
        raise ConfigError(f"properties must be a dict, not {type(properties).__name__}")
    return {_name("component", component): {**COMPONENT_MARKER, **properties}}


def writable_property_ack(name: str, value: Any, version: int, *, status: int = 200,
                          description: Optional[str] = None, component: Optional[str] = None) -> Dict[str, Any]:
    """The reported patch acknowledging a writable property, per the IoT Plug and Play convention::

        writable_property_ack("targetTemp", 21.5, 7, description="applied")
        -> {"targetTemp": {"value": 21.5, "ac": 200, "av": 7, "ad": "applied"}}
        writable_property_ack("targetTemp", 21.5, 7, component="thermostat1")
        -> {"thermostat1": {"__t": "c", "targetTemp": {"value": 21.5, "ac": 200, "av": 7}}}

    ``version`` is the desired ``$version`` being acknowledged (the second argument of ``on_desired``);
    ``status`` an HTTP-like code (200 done, 202 in progress, 400 refused, 500 failed).
    """
    _name("name", name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(f"version must be the desired $version being acknowledged (an int), not {version!r}")
    if isinstance(status, bool) or not isinstance(status, int):
        raise ConfigError(f"status must be an int such as 200, not {status!r}")
    ack: Dict[str, Any] = {"value": value, "ac": status, "av": version}
    if description is not None:
        ack["ad"] = description
    if component is None:
        return {name: ack}
    return component_properties(component, {name: ack})


def split_command(method_name: str) -> Tuple[Optional[str], str]:
    """``"thermostat1*reboot"`` -> ``("thermostat1", "reboot")``; ``"reboot"`` -> ``(None, "reboot")``."""
    component, sep, command = _name("method_name", method_name).partition("*")
    return (component, command) if sep else (None, method_name)


__all__ = ["COMPONENT_MARKER", "component_properties", "split_command", "writable_property_ack"]
