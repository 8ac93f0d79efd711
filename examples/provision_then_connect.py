"""Provision through the Device Provisioning Service (HTTPS, the hardware key), then connect and send.

DPS authenticates the device by its X.509 certificate (an individual or a CA group enrollment) and
answers with the hub and device id to use. With LIGHTCLIENT_ISSUED_CERT it also issues the device
certificate from a CSR that the token signs. With LIGHTCLIENT_PROVISIONING_CACHE the assignment is kept, so
later runs skip DPS until the hub refuses the device.

Configuration comes from the environment (the library itself never reads it):

    PROVISIONING_IDSCOPE            the DPS ID scope, e.g. 0ne00012345
    PROVISIONING_REGISTRATION_ID    the registration id (= the certificate's CN)
    PROVISIONING_HOST               default global.azure-devices-provisioning.net (host[:port])
    PATH_TO_CERTIFICATE_FILE        the certificate chain (PEM) DPS knows the device by, leaf first
    KEY_IDENTIFIER                  key ref, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE            file holding the token PIN (optional; LIGHTCLIENT_PIN works too, but lands in your shell history)
    LIGHTCLIENT_CA                  trusted CA for DPS and the hub (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_ISSUED_CERT         ask DPS to issue a certificate from a CSR, write it here, use it for the hub (optional)
    LIGHTCLIENT_PROVISIONING_CACHE  file to keep the assignment in (optional)
    LIGHTCLIENT_CONNECT_HOST        connect here instead of the assigned hub, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT                default 8883
    LIGHTCLIENT_COUNT               how many telemetry messages to send (default 1)
"""
import os

from lightclient import dps, keys, tls
from lightclient.device import Device
from lightclient.exceptions import ConnectRefusedError
from lightclient.identity import Identity

env = os.environ
scope, registration_id = env["PROVISIONING_IDSCOPE"], env["PROVISIONING_REGISTRATION_ID"]
endpoint, issued = env.get("PROVISIONING_HOST", dps.DEFAULT_ENDPOINT), env.get("LIGHTCLIENT_ISSUED_CERT")
key = keys.load_key(env["KEY_IDENTIFIER"], pin=env.get("LIGHTCLIENT_PIN"), pin_file=env.get("LIGHTCLIENT_PIN_FILE"))  # stays in the token
options = dict(ssl_context=tls.https_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=key, ca=env.get("LIGHTCLIENT_CA")),
               endpoint=endpoint, timeout=120)
if issued:
    options.update(csr=keys.sign_csr(key, registration_id), cert_out=issued)
cache = dps.ProvisioningCache(env["LIGHTCLIENT_PROVISIONING_CACHE"]) if env.get("LIGHTCLIENT_PROVISIONING_CACHE") else None


def provision(force=False):
    if cache is None:
        return dps.provision(scope, registration_id, **options), False
    force = force or bool(issued and not os.path.exists(issued))  # the cache is useless without that certificate
    return dps.provision_cached(cache, scope, registration_id, force=force, **options)


def connect(result):
    identity = Identity(result.assigned_hub, result.device_id)
    context = tls.client_context(cert=issued or env["PATH_TO_CERTIFICATE_FILE"], key=key, ca=env.get("LIGHTCLIENT_CA"))
    device = Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"), port=int(env.get("LIGHTCLIENT_PORT", "8883")))
    device.connect(timeout=60)
    return device


result, from_cache = provision()
print(f"{'cached assignment' if from_cache else 'DPS assigned'}: hub {result.assigned_hub}, device {result.device_id}",
      flush=True)
try:
    device = connect(result)
except ConnectRefusedError:
    if not from_cache:
        raise
    print("the hub refused the cached assignment; provisioning again", flush=True)  # e.g. moved to another hub
    result, _ = provision(force=True)
    device = connect(result)
try:
    for i in range(1, int(env.get("LIGHTCLIENT_COUNT", "1")) + 1):
        device.send_and_wait(f'{{"seq": {i}, "provisioned": true}}', content_type="application/json",
                             content_encoding="utf-8", timeout=30)
        print(f"sent and acknowledged message {i} to {result.assigned_hub}", flush=True)
finally:
    device.disconnect()
