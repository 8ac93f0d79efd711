"""The pure half of lightclient.upload: exact requests, answer parsing, limits, block ids, errors (no sockets)."""
import base64
import json

import pytest

from lightclient import upload
from lightclient.exceptions import ConfigError, ProtocolError, UploadError

SAS = "?sv=2018-03-28&sr=b&sig=SECRETSIG%2Bx%3D&se=2030-01-01T00%3A00%3A00Z&sp=rw"
ANSWER = {"correlationId": "c1", "hostName": "acct.blob.core.windows.net", "containerName": "up",
          "blobName": "dev 1/logs/a b.txt", "sasToken": SAS}


def test_sas_uri_request_wire_format():
    req = upload.sas_uri_request("dev 1", "logs/a.txt", endpoint="hub.azure-devices.net")
    assert req.method == "POST"
    assert req.url == "https://hub.azure-devices.net/devices/dev%201/files?api-version=2020-03-13"
    assert req.body == b'{"blobName":"logs/a.txt"}'
    assert req.headers["Content-Type"] == "application/json" and req.headers["Accept"] == "application/json"
    assert "Authorization" not in req.headers      # X.509: the TLS client certificate authenticates


def test_notification_request_wire_format():
    req = upload.notification_request("d1", "c1", success=False, status_code=503, description="busy",
                                      endpoint="h:8443", api_version="2019-10-01")
    assert req.url == "https://h:8443/devices/d1/files/notifications?api-version=2019-10-01"
    assert json.loads(req.body) == {"correlationId": "c1", "isSuccess": False, "statusCode": 503,
                                    "statusDescription": "busy"}
    assert req.headers["Content-Type"] == "application/json; charset=utf-8"


def test_parse_sas_uri_and_urls():
    target = upload.parse_sas_uri(json.dumps(ANSWER).encode())
    assert target.url == "https://acct.blob.core.windows.net/up/dev%201/logs/a%20b.txt" + SAS
    assert target.redacted_url == "https://acct.blob.core.windows.net/up/dev%201/logs/a%20b.txt?<SAS redacted>"
    assert target.service_version == "2018-03-28"
    assert "SECRETSIG" not in repr(target)
    assert "SECRETSIG" not in target.redact(f"failed at {target.url} sig=SECRETSIG+x=")


def test_sas_token_without_question_mark_is_taken():
    target = upload.parse_sas_uri({**ANSWER, "sasToken": SAS[1:]})
    assert target.sas_token == SAS


@pytest.mark.parametrize("change", [{"sasToken": ""}, {"hostName": None}, {"hostName": "a/b"},
                                    {"correlationId": 5}, {"blobName": "x\ny"}])
def test_parse_sas_uri_refuses_malformed_answers(change):
    with pytest.raises(ProtocolError) as exc:
        upload.parse_sas_uri({**ANSWER, **change})
    assert "SECRETSIG" not in str(exc.value)


@pytest.mark.parametrize("body", [b"not json", b"[]"])
def test_parse_sas_uri_not_an_object(body):
    with pytest.raises(ProtocolError):
        upload.parse_sas_uri(body)


def test_storage_requests():
    target = upload.parse_sas_uri(ANSWER)
    put = upload.put_blob_request(target, b"abc", content_type="text/plain")
    assert put.method == "PUT" and put.url == target.url and put.body == b"abc"
    assert put.headers["x-ms-blob-type"] == "BlockBlob" and put.headers["x-ms-blob-content-type"] == "text/plain"
    bid = upload.block_id(0, b"abc")
    block = upload.put_block_request(target, bid, b"abc")
    assert block.url.endswith("&comp=block&blockid=" + bid.replace("=", "%3D").replace("+", "%2B").replace("/", "%2F"))
    commit = upload.put_block_list_request(target, [bid, "QQ=="])
    assert commit.url == target.url + "&comp=blocklist"
    assert commit.body.endswith(f"<BlockList><Latest>{bid}</Latest><Latest>QQ==</Latest></BlockList>".encode())
    assert upload.get_block_list_request(target).url == target.url + "&comp=blocklist&blocklisttype=uncommitted"


def test_block_ids_have_one_length_and_name_the_content():
    ids = {upload.block_id(i, bytes([i]) * i) for i in range(0, 50)}
    assert len(ids) == 50 and len({len(b) for b in ids}) == 1
    assert len(base64.b64decode(upload.block_id(999_999, b"x"))) <= 64
    assert upload.block_id(3, b"a") != upload.block_id(3, b"b")


def test_parse_block_list():
    body = (b'<?xml version="1.0" encoding="utf-8"?><BlockList><CommittedBlocks><Block><Name>Q0M=</Name>'
            b'<Size>9</Size></Block></CommittedBlocks><UncommittedBlocks><Block><Name>QUE=</Name><Size>4</Size>'
            b'</Block><Block><Name>QUI=</Name><Size>5</Size></Block></UncommittedBlocks></BlockList>')
    assert upload.parse_block_list(body) == {"QUE=": 4, "QUI=": 5}
    assert upload.parse_block_list(b"<BlockList><CommittedBlocks/></BlockList>") == {}
    with pytest.raises(ProtocolError):
        upload.parse_block_list(b"<html>")


@pytest.mark.parametrize("sv,put,block", [("2015-04-05", 64, 4), (None, 64, 4), ("garbage", 64, 4),
                                          ("2016-05-31", 256, 100), ("2018-03-28", 256, 100),
                                          ("2019-07-07", 256, 100), ("2019-12-12", 5000, 4000),
                                          ("2021-08-06", 5000, 4000)])
def test_storage_limits_follow_the_service_version(sv, put, block):
    limits = upload.storage_limits(sv)
    assert (limits.put_blob, limits.block) == (put * upload.MiB, block * upload.MiB)


def test_block_size_grows_to_fit_50000_blocks():
    limits = upload.storage_limits("2018-03-28")
    assert upload.choose_block_size(10 * upload.MiB, upload.MiB, limits) == upload.MiB
    big = 300 * 1024 * upload.MiB
    chosen = upload.choose_block_size(big, upload.MiB, limits)
    assert chosen * 50_000 >= big and chosen <= limits.block
    with pytest.raises(ConfigError, match="too large"):
        upload.choose_block_size(limits.largest_blob + 1, upload.MiB, limits)


@pytest.mark.parametrize("name", ["", None, 5, "a/../b", "./a", "a//b", "dir/", "a.", "x\\y", "t\tab", "\x7f",
                                  "n" * 1025])
def test_bad_blob_names(name):
    with pytest.raises(ConfigError):
        upload.check_blob_name(name)


def test_blob_name_room_counts_the_device_prefix():
    upload.check_blob_name("n" * 1020, "dev")
    with pytest.raises(ConfigError, match="too long"):
        upload.check_blob_name("n" * 1021, "dev")


def test_hub_errors():
    err = upload.hub_error(403, b'{"errorCode": 403006, "message": "Number of active file upload requests '
                                b'exceeded limit"}', {})
    assert isinstance(err, UploadError) and err.status == 403 and err.error_code == "403006"
    assert "at most 10" in str(err)
    assert isinstance(upload.hub_error(400, b"{}", {}, blob_name="x"), ConfigError)
    notify = upload.hub_error(400, b"{}", {}, stage="notify", correlation_id="c")
    assert isinstance(notify, UploadError) and notify.stage == "notify"


def test_storage_error_names_the_code_without_the_sas():
    target = upload.parse_sas_uri(ANSWER)
    body = b"<Error><Code>AuthenticationFailed</Code><Message>Signature did not match sig=SECRETSIG</Message></Error>"
    err = upload.storage_error(403, body, {}, target, "Put Blob")
    assert err.status == 403 and err.error_code == "AuthenticationFailed" and err.stage == "storage"
    assert "SECRETSIG" not in str(err) and "<SAS redacted>" in str(err)
