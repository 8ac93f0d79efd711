"""Pure parts of certificate renewal: the credentials topics and bodies (vectors), the renewal policy
with an injected clock and jitter, the state file format and the crash-recovery decision."""
import json
from pathlib import Path

import pytest

from lightclient import renewal, topics
from lightclient.backoff import Backoff
from lightclient.exceptions import ConfigError, ProtocolError

V = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "credentials.json").read_text())


@pytest.mark.parametrize("case", V["request"], ids=lambda c: c["name"])
def test_request_topic(case):
    assert topics.credentials_request_topic(case["rid"]) == case["topic"]


@pytest.mark.parametrize("case", V["responses"], ids=lambda c: c["name"])
def test_response_topic(case):
    assert topics.parse_credentials_response(case["topic"]) == topics.CredentialsResponse(case["status"], case["rid"])


@pytest.mark.parametrize("topic", V["not_ours"])
def test_response_topic_not_ours(topic):
    assert topics.parse_credentials_response(topic) is None


@pytest.mark.parametrize("topic", V["malformed"])
def test_response_topic_malformed(topic):
    with pytest.raises(ProtocolError):
        topics.parse_credentials_response(topic)


@pytest.mark.parametrize("case", V["bodies"], ids=lambda c: c["name"])
def test_request_body(case):
    body = topics.credentials_request_body(case["device_id"], bytes.fromhex(case["csr_hex"]), case["replace"])
    assert body == case["body"].encode()


@pytest.mark.parametrize("case", V["bad_bodies"], ids=lambda c: c["name"])
def test_request_body_refused(case):
    with pytest.raises(ConfigError):
        topics.credentials_request_body(case["device_id"], bytes.fromhex(case["csr_hex"]), case["replace"])


@pytest.mark.parametrize("case", V["answers"], ids=lambda c: c["name"])
def test_answer_body(case):
    answer = topics.parse_credentials_body(case["status"], case["body"].encode())
    for name, expected in case["fields"].items():
        if name == "certificates_hex":
            assert [c.hex() for c in answer.certificates] == expected
        else:
            assert getattr(answer, name) == expected, name


@pytest.mark.parametrize("case", V["bad_answers"], ids=lambda c: c["name"])
def test_answer_body_malformed(case):
    with pytest.raises(ProtocolError):
        topics.parse_credentials_body(case["status"], case["body"].encode())


# ------------------------------------------------------------------------------------------ policy

DAY = 86400.0
V90 = renewal.Validity("dev", "ca", 1_000_000.0, 1_000_000.0 + 90 * DAY)


def test_policy_fraction_and_jitter():
    p = renewal.RenewalPolicy(fraction=0.8, jitter=0.05)
    assert p.renew_at(V90, 0.0) == V90.not_before + 72 * DAY           # no jitter: exactly 80 %
    assert p.renew_at(V90, 1.0) == V90.not_before + 72 * DAY - 4.5 * DAY  # at most 5 % of 90 days earlier
    ats = {p.renew_at(V90, r / 10) for r in range(10)}
    assert len(ats) == 10 and all(V90.not_before + 67.5 * DAY <= a <= V90.not_before + 72 * DAY for a in ats)


def test_policy_days_before_wins_when_earlier():
    p = renewal.RenewalPolicy(fraction=0.9, days_before=30, jitter=0.0)
    assert p.renew_at(V90, 0.5) == V90.not_after - 30 * DAY
    p = renewal.RenewalPolicy(fraction=0.5, days_before=30, jitter=0.0)
    assert p.renew_at(V90, 0.5) == V90.not_before + 45 * DAY


def test_policy_due_with_injected_clock():
    p = renewal.RenewalPolicy(fraction=0.8, jitter=0.0)
    at = p.renew_at(V90, 0.3)
    assert not p.due(V90, at - 1, 0.3) and p.due(V90, at, 0.3)
    assert V90.expired(V90.not_after) and not V90.expired(V90.not_after - 1)
    assert V90.elapsed_fraction(V90.not_before + 45 * DAY) == 0.5


def test_policy_never_before_not_before():
    short = renewal.Validity("d", "c", 100.0, 110.0)
    assert renewal.RenewalPolicy(fraction=0.01, days_before=1, jitter=0.5).renew_at(short, 1.0) == 100.0


@pytest.mark.parametrize("kwargs", [{"fraction": 0}, {"fraction": 1.5}, {"jitter": -0.1}, {"jitter": True},
                                    {"days_before": -1}, {"grace": "1"}])
def test_policy_bad_values(kwargs):
    with pytest.raises(ConfigError):
        renewal.RenewalPolicy(**kwargs)


def test_failure_delay_backs_off_and_respects_retry_after_and_expiry():
    b = Backoff(initial=2.0, maximum=3600.0, jitter=0.0)
    first = renewal.failure_delay(b, 1, None, 10 * DAY)
    third = renewal.failure_delay(b, 3, None, 10 * DAY)
    assert 0 < first <= 2.0 < third
    assert renewal.failure_delay(b, 1, 300.0, 10 * DAY) == 300.0
    assert renewal.failure_delay(b, 30, None, 100.0) <= 25.0    # never past a quarter of the time left


def test_next_key_label():
    assert renewal.next_key_label("devkey", 1700000000.9) == "devkey-r1700000000900"
    assert renewal.next_key_label("devkey-r1700000000900", 1700000500) == "devkey-r1700000500000"
    assert renewal.next_key_label("dev-root", 5) == "dev-root-r5000"
    # Two routes tried within one second get two labels.
    assert renewal.next_key_label("devkey", 1700000000.1) != renewal.next_key_label("devkey", 1700000000.2)


# ------------------------------------------------------------------------------------------ state


def test_state_round_trip_has_no_pin_and_rejects_damage(tmp_path):
    state = renewal.RenewalState(cert="/c.pem", key="pkcs11:token=t;object=k",
                                 pending=renewal.Pending("written", "hub", "/c.pem.new", "pkcs11:token=t;object=k2",
                                                         "k2", "0011", 5.0),
                                 retire=[renewal.Retirement("pkcs11:token=t;object=k0", "k0", None, 9.0)])
    data = state.to_json()
    assert renewal.RenewalState.from_json(data, "s") == state
    for bad in (b"{", b"[]", json.dumps({"version": 99}).encode(),
                data.replace(b'"written"', b'"elsewhere"')):
        with pytest.raises(ConfigError, match="move it away"):
            renewal.RenewalState.from_json(bad, "s")


@pytest.mark.parametrize("step,matches,action", [
    (None, False, "none"),
    ("csr", True, "rollback"), ("issued", True, "rollback"),
    ("written", True, "try"), ("written", False, "rollback"),
    ("connected", True, "commit"), ("connected", False, "rollback"),
])
def test_recovery_action(step, matches, action):
    pending = renewal.Pending(step, "dps", "/x.new") if step else None
    assert renewal.recovery_action(pending, matches) == action


def test_format_duration():
    assert [renewal.format_duration(s) for s in (42, 125, 7300, 3 * DAY + 7200, -5)] == \
        ["42s", "2m 5s", "2h 1m", "3d 2h", "-5s"]


def test_doctor_warns_in_the_last_fifth_of_a_long_lifetime(tmp_path):
    import datetime as dt
    import subprocess

    from lightclient.commands import doctor

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "100", "-subj", "/CN=d1"],
                   capture_output=True, check=True)
    now = dt.datetime.now(dt.timezone.utc)
    for days, status in ((70, doctor.OK), (85, doctor.WARN)):   # 15 days left: more than 7, less than 20 %
        checks = []
        doctor.check_certificate(checks, str(cert), "d1", None, now=now + dt.timedelta(days=days))
        assert checks[1].status == status, days
        if status == doctor.WARN:
            assert "lightclient renew" in checks[1].fix
