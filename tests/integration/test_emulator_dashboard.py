"""The emulator's web dashboard in a real headless browser (Debian's chromium, driven over the DevTools
protocol): the page loads and shows a connected device, a telemetry message sent after the page loaded
appears without a reload (server-sent events), and a method invoked from the page reaches the device and
its answer appears. The screenshot is kept in build/test-artifacts/dashboard.png."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import requests

from lightclient.emulator.service import Emulator

from .cdp import Browser
from .test_emulator import API, ca_signed_cert, paho_device

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "build" / "test-artifacts" / "dashboard.png"


@pytest.fixture
def clients():
    opened = []
    yield opened
    for client in opened:
        client.close()


def test_dashboard_live_in_headless_chromium(tmp_path, clients):
    with Emulator(tmp_path / "emu", hostname="localhost") as emu:
        dashboard = emu.start_dashboard(0)
        emu.register_device("thermostat-1")
        cert, key = ca_signed_cert(emu, tmp_path, "thermostat-1")
        device = paho_device(emu, clients, "thermostat-1", cert, key,
                             username=f"localhost/thermostat-1/?{API}&model-id=dtmi:com:example:Thermostat;1")
        device.connect()
        device.subscribe("$iothub/methods/POST/#", "$iothub/twin/res/#")
        device.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"firmware": "1.4.2"}')
        emu.update_desired("thermostat-1", {"targetTemperature": 21.5})

        def answer_method():
            message = device.wait_message("$iothub/methods/POST/reboot/", timeout=60)
            rid = message.topic.rsplit("$rid=", 1)[1]
            request = json.loads(message.payload)
            device.publish(f"$iothub/methods/res/200/?$rid={rid}", json.dumps({"rebooting-in": request["delay"]}))

        responder = threading.Thread(target=answer_method, daemon=True)
        responder.start()
        browser = Browser(tmp_path / "profile")
        try:
            browser.call("Page.enable")
            browser.call("Page.navigate", url=dashboard.url)
            # Loaded, and the device shows as connected (with its announced model).
            browser.wait_for("document.querySelector('tr[data-device=\"thermostat-1\"][data-connected=\"true\"]')"
                             " !== null", what="thermostat-1 as connected")
            assert "dtmi:com:example:Thermostat;1" in browser.evaluate("document.querySelector('#devices').innerText")
            browser.wait_for("document.querySelector('#live').textContent === 'live'", what="the live stream")
            loaded_at = browser.evaluate("performance.timeOrigin")

            # Telemetry sent now, after the load, appears without a reload.
            device.publish("devices/thermostat-1/messages/events/%24.ct=application%2Fjson&unit=C",
                           b'{"temperature": 22.75}')
            browser.wait_for("document.querySelector('#feed').innerText.includes('22.75')",
                             what="the telemetry message in the feed")
            assert browser.evaluate("performance.timeOrigin") == loaded_at, "the page reloaded"

            # A method invoked from the page's form reaches the device; its answer appears on the page.
            browser.evaluate("""(() => {
                const f = document.getElementById('method-form');
                f.deviceId.value = 'thermostat-1'; f.methodName.value = 'reboot'; f.payload.value = '{"delay": 3}';
                f.querySelector('button').click(); return true; })()""")
            result = browser.wait_for("document.querySelector('#method-result').textContent", what="the method result")
            assert json.loads(result) == {"status": 200, "payload": {"rebooting-in": 3}}
            browser.wait_for("document.querySelector('#feed [data-kind=\"method-result\"]') !== null",
                             what="the method answer in the feed")
            responder.join(10)
            assert browser.evaluate("performance.timeOrigin") == loaded_at, "the page reloaded"
            browser.screenshot(ARTIFACT)
        finally:
            browser.close()
        assert ARTIFACT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashboard_api_refuses_bad_requests_and_non_loopback(tmp_path):
    from lightclient.emulator.dashboard import Dashboard
    from lightclient.emulator.errors import EmulatorError

    with Emulator(tmp_path / "emu") as emu:
        with pytest.raises(EmulatorError, match="loopback only"):
            Dashboard(emu, "0.0.0.0", 0)
        url = emu.start_dashboard(0).url
        assert requests.get(url, timeout=10).headers["Content-Type"].startswith("text/html")
        assert requests.get(url + "static/../dashboard.py", timeout=10).status_code == 404
        reply = requests.post(url + "api/method", json={"deviceId": "nobody", "methodName": "x"}, timeout=10)
        assert reply.status_code == 404 and "not found" in reply.json()["message"]
        assert requests.post(url + "api/c2d", data=b"[1]", timeout=10).status_code == 400
