"""A strict local Azure IoT Hub emulator for tests, demos and protocol debugging.

Standard library only (asyncio, ssl, json, http.server) plus the ``openssl`` command for certificates;
nothing here imports paho or the lightclient client code, and the client never imports this package.

Modules:
    codec        MQTT 3.1.1 packet records and a strict, bounded, pure codec
    namespace    the hub's per-identity topics, subscription rules and property-bag encoding (pure)
    registry     device/module identities and the CONNECT authorization rules (pure)
    twin         twin documents and merge patches
    hub          shared hub state: sessions, twins, C2D queues, direct-method calls
    connection   one device connection: TLS, CONNECT, then each packet against the hub's rules
    service      Emulator: the thread-safe in-process service API
    http_api     a loopback HTTP API shaped like the IoT Hub service REST API
    certs        the CA, server and device certificates (via the openssl CLI)
    diagnostics  readable records of every protocol deviation
    dps          the Device Provisioning Service over HTTPS; dps_mqtt the same DPS over MQTT
    peer_trust   authorization of client certificates at CONNECT (loads the native shim when built)
    routing      IoT Edge style module output -> input routes
    c2d_feedback C2D expiry ($.exp) and Success/Expired feedback
    throttle     optional per-identity rates (CONNACK 3, 429, disconnect)
    dashboard    the live web dashboard (static/ holds its HTML, CSS and JS)
"""
from .diagnostics import Diagnostic
from .errors import EmulatorError, HubError
from .events import Event
from .registry import Identity
from .service import Emulator, MethodResult

__all__ = ["Emulator", "MethodResult", "Event", "Diagnostic", "Identity", "EmulatorError", "HubError"]
