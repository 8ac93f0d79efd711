"""The shared HTTPS core never follows a redirect and never speaks plain HTTP (issue 12, item 1).

A real HTTPS "DPS" on loopback answers with 301/302/307/308 pointing at a listener that records every
connection and byte: provisioning must fail with a typed error naming the status and the Location, and
the listener must receive nothing at all, neither over http:// nor as "another https:// host".
"""
import re

import pytest
import requests

from lightclient import dps, tls
from lightclient.exceptions import ConfigError, ProvisioningError, ServiceError

from .httpservers import Recorder, RedirectingHttps

SCOPE = "0ne00000001"
FAST = dict(poll_interval=(0.05, 0.2), timeout=20, request_timeout=5)


@pytest.fixture
def https_ctx(device, test_ca):
    return tls.https_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)


@pytest.fixture
def recorder():
    rec = Recorder()
    yield rec
    rec.close()


def _location(scheme, recorder):
    # "another host" for https: 127.0.0.1 and another port, where the DPS is localhost:<its port>
    return f"{scheme}://127.0.0.1:{recorder.port}/{SCOPE}/registrations/device-ec/register?api-version=2021-10-01"


def _assert_untouched(recorder):
    recorder.close()  # joins the thread and counts what is still in the backlog
    assert recorder.connections == 0
    assert bytes(recorder.received) == b""


@pytest.mark.parametrize("on", ["PUT", "GET"])
@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_provisioning_never_follows_a_redirect(https_ctx, test_ca, recorder, status, scheme, on):
    location = _location(scheme, recorder)
    server = RedirectingHttps(test_ca, status, location, on=on)
    try:
        with pytest.raises(ProvisioningError) as exc:
            dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=server.endpoint, **FAST)
    finally:
        server.close()
    assert exc.value.status == status and not exc.value.retryable
    assert f"DPS answered {status} redirecting to {location}" in str(exc.value)
    assert "never follows redirects" in str(exc.value)
    assert [m for m, _ in server.requests] == (["PUT"] if on == "PUT" else ["PUT", "GET"])
    _assert_untouched(recorder)


def test_provisioning_on_a_callers_plain_session_does_not_follow_either(test_ca, recorder):
    """The core itself sends with allow_redirects=False, whatever session it is given."""
    location = _location("http", recorder)
    server = RedirectingHttps(test_ca, 307, location)
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace verify=
    session.verify = str(test_ca.cert)
    try:
        with pytest.raises(ProvisioningError, match=re.escape(f"307 redirecting to {location}")):
            dps.provision(SCOPE, "device-ec", session=session, endpoint=server.endpoint, **FAST)
    finally:
        session.close()
        server.close()
    _assert_untouched(recorder)


@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
def test_https_session_refuses_plain_http(https_ctx, recorder, method):
    session = tls.https_session(https_ctx)
    with session, pytest.raises(ConfigError, match="speaks only HTTPS") as exc:
        session.request(method, f"http://127.0.0.1:{recorder.port}/register", data=b'{"registrationId":"x"}')
    assert "give an https:// URL" in str(exc.value)
    _assert_untouched(recorder)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_https_session_does_not_follow_a_redirect_even_when_asked(https_ctx, test_ca, recorder, scheme):
    location = _location(scheme, recorder)
    server = RedirectingHttps(test_ca, 308, location)
    session = tls.https_session(https_ctx)
    try:
        # requests follows redirects by default; this session raises instead.
        with pytest.raises(ServiceError, match=re.escape(f"answered 308 redirecting to {location}")) as exc:
            session.put(f"https://localhost:{server.port}/register", data=b"{}")
        assert exc.value.status == 308
        # Asked not to follow, it hands back the 3xx itself, with nothing queued to follow.
        resp = session.put(f"https://localhost:{server.port}/register", data=b"{}", allow_redirects=False)
        assert resp.status_code == 308 and resp.next is None
    finally:
        session.close()
        server.close()
    _assert_untouched(recorder)


def test_context_adapter_is_a_function_name_not_a_class_name():
    assert callable(tls.context_adapter)
    assert not hasattr(tls, "ContextAdapter")


def test_an_oversized_answer_is_refused_unread(https_ctx, test_ca):
    """A DPS answer is a few KiB; one over the core's 1 MiB cap is a typed error, not a memory hog."""
    from lightclient import _https

    server = RedirectingHttps(test_ca, 200, None, body=b"[" + b" " * (_https.MAX_BODY + 1) + b"]")
    try:
        with pytest.raises(ProvisioningError, match=f"more than {_https.MAX_BODY} bytes"):
            dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=server.endpoint, **FAST)
    finally:
        server.close()
