"""Identity: validation, client id and username, driven by tests/vectors/identity.json."""
import dataclasses
import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest

import lightclient
from lightclient.exceptions import ConfigError
from lightclient.identity import API_VERSION, Identity

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "identity.json").read_text(encoding="utf-8"))


def _username_args(case):
    return {key: case[key] for key in ("api_version", "client_type") if key in case}


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_valid_identity_gives_exact_client_id_and_username(case):
    identity = Identity(**case["identity"])
    assert identity.client_id == case["client_id"]
    assert identity.username(**_username_args(case)) == case["username"]


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_invalid_identity_is_refused_with_a_reason(case):
    with pytest.raises(ConfigError, match=re.escape(case["match"])):
        Identity(**case["identity"])


@pytest.mark.parametrize("case", VECTORS["invalid_username"], ids=lambda c: c["name"])
def test_invalid_username_arguments_are_refused(case):
    identity = Identity(**case["identity"])
    with pytest.raises(ConfigError, match=re.escape(case["match"])):
        identity.username(**_username_args(case))


def test_default_api_version_is_2021_04_12():
    assert API_VERSION == "2021-04-12"
    assert "/?api-version=2021-04-12&" in Identity("h", "d1").username(client_type="t")


def test_default_client_type_names_lightclient_and_its_version():
    username = Identity("hub.azure-devices.net", "d1").username()
    expected = "DeviceClientType=" + quote("lightclient/" + lightclient.__version__, safe="")
    assert username == f"hub.azure-devices.net/d1/?api-version=2021-04-12&{expected}"


def test_identity_is_immutable():
    identity = Identity("h", "d1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.device_id = "d2"  # type: ignore[misc]


def test_is_module():
    assert not Identity("h", "d1").is_module
    assert Identity("h", "d1", "m1").is_module
