"""The shared HTTPS core's pure parts: retry delays, the https-only rule, redirect messages (no sockets)."""
import pytest

from lightclient import _https, dps
from lightclient.backoff import Backoff
from lightclient.exceptions import ConfigError

DPS_LIKE = Backoff(initial=0.05, maximum=0.2)


@pytest.mark.parametrize("headers, expect", [
    ({"Retry-After": "1"}, 0.2),        # the server's wish, clamped to the maximum
    ({"retry-after": "0"}, 0.05),       # ... and to the minimum
    ({"RETRY-AFTER": "0.1"}, 0.1),
    ({"Retry-After": "soon"}, 0.2),     # garbage: the 2 s default, clamped
])
def test_retry_after_wins_over_back_off_and_is_clamped(headers, expect):
    for attempt in (0, 5):
        assert _https.retry_delay(headers, attempt, backoff=DPS_LIKE, minimum=0.05, maximum=0.2,
                                  rand=lambda: 0.0) == expect


def test_without_retry_after_the_one_backoff_decides():
    delays = [_https.retry_delay({}, n, backoff=DPS_LIKE, minimum=0.05, maximum=0.2, rand=lambda: 0.0)
              for n in range(5)]
    assert delays == [0.05, 0.1, 0.2, 0.2, 0.2]
    # jitter: the same attempt drawn at the other end of the range waits half as long
    assert _https.retry_delay({}, 1, backoff=DPS_LIKE, minimum=0.05, maximum=0.2, rand=lambda: 1.0) == 0.05


def test_dps_keeps_its_retry_after_name():
    assert dps.retry_after is _https.retry_after and dps.Request is _https.Request


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "HTTP://dps/x", "ftp://dps/x", "//dps/x", "dps/x", "", None])
def test_only_https_urls_are_sent(url):
    with pytest.raises(ConfigError, match="speaks only HTTPS"):
        _https.require_https("PUT", url)


@pytest.mark.parametrize("url", ["https://dps/x", "HTTPS://127.0.0.1:8443/x"])
def test_https_urls_pass(url):
    _https.require_https("GET", url)


def test_redirect_message_names_status_and_location_and_tames_it():
    text = _https.redirect_message("DPS", 307, "http://x/register")
    assert text == ("DPS answered 307 redirecting to http://x/register: lightclient never follows redirects; "
                    "check the endpoint")
    hostile = _https.redirect_message("DPS", 302, "http://x/\x1b[2J\r\nSet-Cookie: a" + "y" * 1000)
    assert "\x1b" not in hostile and "\r" not in hostile and "\n" not in hostile
    assert len(hostile) < 400 and "…" in hostile
    assert "without a Location" in _https.redirect_message("DPS", 300, None)


@pytest.mark.parametrize("interval", [(2.0, 1.0), (-1, 1), (0.1, float("nan")), "fast", (1,), (True, 2),
                                      (1, float("inf"))])
def test_bad_poll_interval_is_refused_before_any_connection(interval):
    with pytest.raises(ConfigError, match="poll_interval"):
        dps.provision("0ne1", "d", poll_interval=interval)
