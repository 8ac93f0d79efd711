"""A cheaper PUBACK for paho 2's MQTT 3.1.1 clients: the packet id from its two bytes, nothing else.

paho 2 decodes every PUBACK as if it were MQTT 5: it builds a ``ReasonCode()`` and a ``Properties()``
for each one, which is a fifth of the CPU a telemetry stream costs (for Device and raw paho alike). An
MQTT 3.1.1 PUBACK has no reason code and no properties, so :func:`install` replaces the PUBACK handler of
one paho client with one that reads the packet id and hands paho's own ``_do_on_publish`` (which keeps
paho's bookkeeping: the in-flight count, the next queued message, ``MQTTMessageInfo``) one shared
"Success" reason code and one empty property set. Everything else (PUBCOMP, MQTT 5, a malformed PUBACK,
debug logging) goes to paho's own handler.

It relies on paho internals, so it is used only with the paho versions it was checked against
(:data:`CHECKED`) and only if those internals look as expected; otherwise paho's stock behaviour stays
(:func:`install` returns False and says why in :func:`unavailable`). ``enabled = False`` (a test switch)
forces the stock path for every Device made afterwards.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

#: paho-mqtt minor versions whose PUBACK handling this module was checked against.
CHECKED = ((2, 0), (2, 1), (2, 2))

#: False: every Device made afterwards keeps paho's stock PUBACK handling (the test suite runs both).
enabled = True

_REQUIRED = ("_handle_pubackcomp", "_do_on_publish", "_in_packet", "_protocol", "_out_message_mutex",
             "_out_messages", "_logger", "on_log")


def paho_version() -> Optional[tuple]:
    try:
        import paho.mqtt as package

        return tuple(int(part) for part in package.__version__.split(".")[:2])
    except (ImportError, AttributeError, ValueError):
        return None


def unavailable(client: Any) -> Optional[str]:
    """Why the fast PUBACK cannot be used with ``client`` (None: it can)."""
    import paho.mqtt.client as mqtt

    version = paho_version()
    if version not in CHECKED:
        return f"paho-mqtt {version} is not one of the versions checked ({', '.join('%d.%d' % v for v in CHECKED)})"
    missing = [name for name in _REQUIRED if not hasattr(client, name)]
    if missing:
        return f"paho's client lacks {', '.join(missing)}"
    if not isinstance(client._in_packet, dict) or "packet" not in client._in_packet:
        return "paho's incoming packet is not the expected dict"
    try:
        if len(inspect.signature(client._do_on_publish).parameters) != 3:
            return "paho's _do_on_publish takes other arguments"
    except (TypeError, ValueError):
        return "paho's _do_on_publish has no signature"
    if client._protocol != mqtt.MQTTv311:
        return "the client does not speak MQTT 3.1.1"
    return None


def install(client: Any) -> bool:
    """Give ``client`` the cheaper PUBACK handler if this paho allows it; True if it did."""
    if not enabled or unavailable(client) is not None:
        return False
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    stock = client._handle_pubackcomp
    do_on_publish = client._do_on_publish
    out_messages_mutex = client._out_message_mutex
    success = ReasonCode(PacketTypes.PUBACK)   # shared: Device's on_publish never looks at them
    no_properties = Properties(PacketTypes.PUBACK)

    def handle_pubackcomp(cmd: str) -> Any:
        packet = client._in_packet["packet"]  # paho makes a new dict per connection: look it up each time
        if cmd != "PUBACK" or len(packet) != 2 or client.on_log is not None or _debug(client._logger):
            return stock(cmd)  # PUBCOMP, a malformed PUBACK, or someone reading paho's debug log
        mid = (packet[0] << 8) | packet[1]
        with out_messages_mutex:
            if mid in client._out_messages:
                return do_on_publish(mid, success, no_properties)
        return 0  # MQTT_ERR_SUCCESS: an ack for a message paho no longer holds, as paho ignores it

    client._handle_pubackcomp = handle_pubackcomp
    return True


def _debug(logger: Optional[logging.Logger]) -> bool:
    return logger is not None and logger.isEnabledFor(logging.DEBUG)


__all__ = ["CHECKED", "enabled", "install", "paho_version", "unavailable"]
