"""lightclient: an Azure IoT Hub device client on paho-mqtt whose X.509 key never leaves its token.

The names most programs need are here, imported on first use (PEP 562), so ``import lightclient``
stays as cheap as before and pulls in neither paho nor ssl until one of them is touched::

    from lightclient import Device, Identity, tls
"""

__version__ = "0.1.0"

# name -> (module, attribute or "" for the module itself)
_LAZY = {
    "Device": ("lightclient.device", "Device"),
    "Identity": ("lightclient.identity", "Identity"),
    "dps": ("lightclient.dps", ""),
    "exceptions": ("lightclient.exceptions", ""),
    "tls": ("lightclient.tls", ""),
}

__all__ = ["Device", "Identity", "__version__", "dps", "exceptions", "tls"]

# Static analysers see the real imports; importing typing here would cost start-up time for nothing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from . import dps, exceptions, tls
    from .device import Device
    from .identity import Identity
del TYPE_CHECKING


def __getattr__(name: str):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'lightclient' has no attribute {name!r}") from None
    from importlib import import_module

    value = import_module(module_name)
    if attribute:
        value = getattr(value, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
