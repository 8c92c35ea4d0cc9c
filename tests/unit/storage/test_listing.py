"""The lean lister over real HTTP (a loopback server standing in for a store that misbehaves):
answers that are not S3 listings become typed `ListingFailed`, never a parser's error."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

from serve_app.config import StoreConfig
from serve_app.storage.listing import ListingFailed, S3Lister

ANSWERS = {
    "/html-502": (502, b"<html><body>Bad Gateway</body></html"),  # not even well-formed
    "/garbage-200": (200, b"this is not xml"),
    "/empty-200": (200, b""),
    "/nobucket": (404, b"<Error><Code>NoSuchBucket</Code></Error>"),
}


class _Store(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ANSWERS[self.path.split("?")[0]]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lister() -> Iterator[S3Lister]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = StoreConfig(
        url="s3://b/p",
        endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
        access_key_id=SecretStr("k"),
        secret_access_key=SecretStr("s"),
        retries=0,
    )
    try:
        yield S3Lister(config)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("bucket", "status", "code"),
    [
        ("html-502", 502, None),
        ("garbage-200", 200, "NotAListing"),
        ("empty-200", 200, "NotAListing"),
    ],
)
def test_answers_that_are_not_listings_fail_typed(
    lister: S3Lister, bucket: str, status: int, code: str | None
) -> None:
    with pytest.raises(ListingFailed) as failed:
        lister.keys(bucket, "p/")
    assert (failed.value.status, failed.value.code) == (status, code)


def test_no_such_bucket_is_file_not_found(lister: S3Lister) -> None:
    with pytest.raises(FileNotFoundError):
        lister.keys("nobucket", "p/")
