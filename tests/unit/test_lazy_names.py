"""The top package's names (PEP 562): ``from lightclient import Device`` works, and ``import lightclient``
alone imports none of the heavy modules (paho, ssl, the native shim, requests, sqlite3).

Each check runs in a fresh interpreter: this test process has long imported everything."""
import json
import subprocess
import sys

import lightclient

HEAVY = ("paho", "ssl", "_ssl", "cffi", "requests", "sqlite3", "concurrent.futures", "lightclient.device",
         "lightclient.tls", "lightclient.dps", "lightclient._native", "lightclient.identity", "lightclient.exceptions")


def _fresh(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_import_lightclient_imports_nothing_heavy():
    modules = _fresh("import sys, json; import lightclient; print(json.dumps(sorted(sys.modules)))")
    eager = [m for m in modules if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY))]
    assert eager == []
    assert [m for m in modules if m.startswith("lightclient")] == ["lightclient"]


def test_each_lazy_name_resolves_to_the_module_or_class_it_names():
    checks = _fresh(
        "import json, sys\n"
        "from lightclient import Device, Identity, dps, exceptions, tls\n"
        "import lightclient.device, lightclient.identity\n"
        "print(json.dumps({\n"
        "    'Device': Device is lightclient.device.Device,\n"
        "    'Identity': Identity is lightclient.identity.Identity,\n"
        "    'dps': dps is sys.modules['lightclient.dps'],\n"
        "    'exceptions': exceptions is sys.modules['lightclient.exceptions'],\n"
        "    'tls': tls is sys.modules['lightclient.tls'],\n"
        "}))")
    assert checks == {"Device": True, "Identity": True, "dps": True, "exceptions": True, "tls": True}


def test_only_the_name_used_is_imported():
    modules = _fresh("import sys, json, lightclient; lightclient.Identity; print(json.dumps(sorted(sys.modules)))")
    assert "lightclient.identity" in modules
    assert not {"lightclient.device", "lightclient.tls", "lightclient.dps", "paho.mqtt.client"} & set(modules)


def test_dir_all_and_unknown_names():
    assert set(lightclient.__all__) == {"Device", "Identity", "__version__", "dps", "exceptions", "tls"}
    assert set(lightclient.__all__) <= set(dir(lightclient))
    assert lightclient.Device.__name__ == "Device" and lightclient.exceptions.ConfigError.__name__ == "ConfigError"
    try:
        lightclient.Devices
    except AttributeError as exc:
        assert "'Devices'" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
    # Submodules that are not lazy names still import the usual way.
    from lightclient import topics
    assert topics.__name__ == "lightclient.topics"


def test_a_renewer_attaching_a_sync_device_does_not_import_asyncio_support():
    # Renewer.attach() hands an aio Device its blocking face; a sync user must not pay for lightclient.aio.
    modules = _fresh(
        "import json, ssl, sys\n"
        "from lightclient import renewal\n"
        "from lightclient.device import Device\n"
        "from lightclient.identity import Identity\n"
        "device = Device(Identity('localhost', 'd1'), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))\n"
        "renewer = renewal.Renewer(cert='device.pem', key='device.key', device_id='d1', routes=('hub',))\n"
        "renewer.attach(device)\n"
        "assert renewer.device is device\n"
        "print(json.dumps(sorted(sys.modules)))")
    assert "lightclient.device" in modules and "lightclient.aio" not in modules
