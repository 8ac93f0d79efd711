"""The emulator's C2D expiry parsing ($.exp / iothub-expiry): ISO 8601 as the service sends it, on every Python."""
import datetime

import pytest

from lightclient.emulator.c2d_feedback import parse_expiry
from lightclient.emulator.errors import HubError

EPOCH_2030 = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


@pytest.mark.parametrize("text, expected", [
    ("2030-01-01T00:00:00Z", EPOCH_2030),
    ("2030-01-01T00:00:00.5Z", EPOCH_2030 + 0.5),
    ("2030-01-01T00:00:00.573770Z", EPOCH_2030 + 0.57377),          # strftime's %f, as the tests send it
    ("2030-01-01T00:00:00.1234567Z", EPOCH_2030 + 0.123456),        # .NET's 7 digits
    ("2030-01-01T02:00:00.25+02:00", EPOCH_2030 + 0.25),            # a fraction before an offset
    ("2030-01-01T00:00:00", EPOCH_2030),                            # no zone: UTC
])
def test_expiry_times_parse_with_fractions_and_offsets(text, expected):
    assert parse_expiry(text) == pytest.approx(expected)


def test_a_malformed_expiry_is_a_400():
    with pytest.raises(HubError) as err:
        parse_expiry("soon")
    assert err.value.status == 400
