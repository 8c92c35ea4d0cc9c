"""The lean lister over real HTTP (a loopback server standing in for a store that misbehaves):
answers that are not S3 listings become typed `ListingFailed`, never a parser's error, and a
listing that would never end (a repeated continuation token, pages without end) stops with
`EndlessListing`, a 503 for the store's callers (issue 15 item 5)."""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

from serve_app.config import StoreConfig
from serve_app.errors import StorageUnavailable
from serve_app.storage.listing import EndlessListing, ListingFailed, S3Lister
from serve_app.storage.store import ModelStore

ANSWERS = {
    "/html-502": (502, b"<html><body>Bad Gateway</body></html"),  # not even well-formed
    "/garbage-200": (200, b"this is not xml"),
    "/empty-200": (200, b""),
    "/nobucket": (404, b"<Error><Code>NoSuchBucket</Code></Error>"),
}


PAGES: list[str] = []  # continuation tokens the paging buckets were asked for


def _page(token: str | None, next_token: str) -> bytes:
    """One truncated ListObjectsV2 page of two keys, pointing at `next_token`."""
    ns = "http://s3.amazonaws.com/doc/2006-03-01/"
    n = int(token or 0)
    contents = "".join(
        f"<Contents><Key>p/m{n}-{i}/1/manifest.json</Key><Size>10</Size></Contents>"
        for i in range(2)
    )
    return (
        f'<ListBucketResult xmlns="{ns}">{contents}<IsTruncated>true</IsTruncated>'
        f"<NextContinuationToken>{next_token}</NextContinuationToken></ListBucketResult>"
    ).encode()


class _Store(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        bucket, _, query = self.path.partition("?")
        token = urllib.parse.parse_qs(query).get("continuation-token", [None])[0]
        if bucket in ("/loop", "/endless"):
            PAGES.append(token or "")
            if len(PAGES) > 50:  # NOTE: a lister that never stops fails here, not hangs
                self._answer(500, b"<Error><Code>TooManyPages</Code></Error>")
                return
            # /loop: the second page names itself again; /endless: a new token every page
            next_token = "1" if bucket == "/loop" else str(int(token or 0) + 1)
            self._answer(200, _page(token, next_token))
            return
        self._answer(*ANSWERS[bucket])

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def config() -> Iterator[StoreConfig]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    PAGES.clear()
    try:
        yield StoreConfig(
            url="s3://b/p",
            endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
            access_key_id=SecretStr("k"),
            secret_access_key=SecretStr("s"),
            retries=0,
            max_list_pages=5,
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def lister(config: StoreConfig) -> S3Lister:
    return S3Lister(config)


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


def test_a_repeated_continuation_token_stops_the_listing(lister: S3Lister) -> None:
    with pytest.raises(EndlessListing, match="repeated a continuation token") as failed:
        lister.keys("loop", "p/")
    assert failed.value.pages == 2
    assert PAGES == ["", "1"]  # the second page pointed at itself: never asked again


def test_a_listing_stops_after_the_page_cap(lister: S3Lister) -> None:
    with pytest.raises(EndlessListing, match="max_list_pages") as failed:
        lister.keys("endless", "p/")
    assert failed.value.pages == 5
    assert len(PAGES) == 5


@pytest.mark.parametrize("bucket", ["loop", "endless"])
def test_an_endless_listing_is_503_for_the_store_and_no_fallback(
    config: StoreConfig, bucket: str
) -> None:
    store = ModelStore(config.model_copy(update={"url": f"s3://{bucket}/p"}))
    try:
        with pytest.raises(StorageUnavailable, match="EndlessListing"):
            store.list_manifest_paths()
        assert store._lister is not None  # NOTE: not handed to s3fs, which would loop too
    finally:
        store.close()


def test_listing_reports_each_object_size(lister: S3Lister) -> None:
    with pytest.raises(EndlessListing):
        lister.objects("endless", "p/")
    PAGES.clear()
    # NOTE: a listing of one page: the sizes the store reads manifests' caps from
    body = _page(None, "x").replace(b"<IsTruncated>true", b"<IsTruncated>false")
    ANSWERS["/one-page"] = (200, body)
    assert lister.objects("one-page", "p/") == [
        ("p/m0-0/1/manifest.json", 10),
        ("p/m0-1/1/manifest.json", 10),
    ]
