"""lightclient: an Azure IoT Hub device client on paho-mqtt whose X.509 key never leaves its token."""

__version__ = "0.1.0"
