"""The collection's listing (gallery pages, label counts): the in-memory logic, and over a real Milvus Lite."""

import threading
import time

import numpy as np
import pytest

from bento.adapters.vectors import VectorIndex
from bento.core.config import Settings
from bento.core.errors import BackendUnavailable, SearchError
from bento.domain.listing import BrowseQuery, CollectionListing, ListedImage
from tests.support import toy_model, toy_records


def _image(number: int, label: str, created_at: int) -> ListedImage:
    return ListedImage(f"{number:064x}", label, created_at)


def _ids(listing: CollectionListing, **query) -> list[int]:
    page, ids = listing.page(BrowseQuery(**query))
    assert page.state == "ready"
    return [int(image_id, 16) for image_id in ids]


def test_pages_are_newest_first_with_ties_broken_by_id_and_filter_by_label():
    images = [_image(n, "cat" if n % 3 else "dog", created_at=100 + n // 2) for n in range(10)]
    listing = CollectionListing(lambda: list(reversed(images)))
    # Newest first; two images share each second and come in id order.
    assert _ids(listing, limit=4) == [8, 9, 6, 7]
    assert _ids(listing, offset=4, limit=4) == [4, 5, 2, 3]
    assert _ids(listing, offset=8, limit=4) == [0, 1]
    assert _ids(listing, label="dog", limit=10) == [9, 6, 3, 0]
    assert listing.page(BrowseQuery(label="dog"))[0].total == 4
    assert _ids(listing, label="nobody") == []
    assert [(entry.label, entry.image_count) for entry in listing.labels().labels] == [("cat", 6), ("dog", 4)]


def test_writes_through_this_process_show_on_the_next_page_without_a_scan():
    scans = []

    def scan():
        scans.append(1)
        return [_image(1, "a", 10), _image(2, "a", 20)]

    listing = CollectionListing(scan, max_age_s=3600)
    assert _ids(listing) == [2, 1]
    listing.upserted([_image(3, "b", 30), _image(1, "c", 10)])  # a new image, and a label changed
    listing.deleted([f"{2:064x}"])
    assert _ids(listing) == [3, 1]
    assert {entry.label: entry.image_count for entry in listing.labels().labels} == {"b": 1, "c": 1}
    assert len(scans) == 1


def test_a_process_that_never_lists_keeps_nothing_and_many_writes_are_folded_in(monkeypatch):
    import bento.domain.listing as listing_module

    listing = CollectionListing(lambda: [_image(1, "a", 10)])
    listing.upserted(_image(n, "a", n) for n in range(2, 500))  # an ingest job: no listing read yet
    assert not listing._pending.upserted
    assert _ids(listing) == [1]
    monkeypatch.setattr(listing_module, "MAX_PENDING_WRITES", 100)
    listing.upserted(_image(n, "b", 1000 + n) for n in range(2, 150))
    assert not listing._pending.upserted, "folded into the snapshot at once"
    assert len(listing._snapshot.codes) == 149
    assert _ids(listing, limit=2) == [149, 148]


def test_a_write_made_while_a_scan_runs_is_not_lost_when_the_scan_lands():
    started, release = threading.Event(), threading.Event()

    def slow_scan():
        started.set()
        release.wait(10)
        return [_image(1, "a", 10)]  # read before the write below reached Milvus

    listing = CollectionListing(slow_scan)
    reader = threading.Thread(target=lambda: listing.page(BrowseQuery()))
    reader.start()
    started.wait(10)
    listing.upserted([_image(2, "a", 20)])
    release.set()
    reader.join(10)
    assert _ids(listing) == [2, 1]


def test_an_old_listing_is_served_while_a_fresh_one_is_read_then_replaced():
    generation = [[_image(1, "a", 10)]]
    started, release = threading.Event(), threading.Event()

    def scan():
        if len(generation) > 1:  # the refresh: held until the test has seen the old listing served
            started.set()
            release.wait(10)
        return list(generation[-1])

    listing = CollectionListing(scan, max_age_s=0.05)
    assert _ids(listing) == [1]
    generation.append([_image(1, "a", 10), _image(2, "a", 20)])  # written by another process
    time.sleep(0.1)  # older than max_age_s now
    assert _ids(listing) == [1], "the old listing, at once, while the fresh one is read"
    assert started.wait(10)
    release.set()
    listing._scanning and listing._scanning.join(10)
    assert _ids(listing) == [2, 1]


def test_a_scan_that_crashes_is_reported_and_never_blocks_the_next_one():
    attempts = []

    def broken_scan():
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("non-hexadecimal number found in fromhex()")  # a bug, not an outage
        return [_image(1, "a", 10)]

    listing = CollectionListing(broken_scan)
    with pytest.raises(SearchError, match="ValueError"):
        listing.page(BrowseQuery())
    assert listing._scanning is None and listing._during_scan is None
    assert _ids(listing) == [1]


def test_deletes_during_a_scan_and_an_invalidated_scan(monkeypatch):
    import bento.domain.listing as listing_module

    monkeypatch.setattr(listing_module, "FIRST_SCAN_WAIT_S", 0.2)  # the reader of the dropped scan gives up soon
    started, release = threading.Event(), threading.Event()
    rows = [[_image(1, "a", 10), _image(2, "a", 20)]]

    def slow_scan():
        started.set()
        release.wait(10)
        return list(rows[-1])

    listing = CollectionListing(slow_scan)
    reader = threading.Thread(target=lambda: listing.page(BrowseQuery()))
    reader.start()
    started.wait(10)
    listing.deleted([f"{2:064x}"])  # read by the scan before it was deleted
    release.set()
    reader.join(10)
    assert _ids(listing) == [1]

    started.clear()
    release.clear()
    listing.invalidate()
    first = threading.Thread(target=lambda: listing.page(BrowseQuery()))
    first.start()
    started.wait(10)
    listing.invalidate()  # the collection was replaced while the scan ran: its result is thrown away
    rows.append([_image(7, "b", 70)])
    release.set()
    first.join(10)
    listing._scanning and listing._scanning.join(10)
    assert _ids(listing) == [7]


def test_a_new_upload_goes_first_without_a_full_sort_and_ties_still_sort_by_id():
    listing = CollectionListing(lambda: [_image(n, "a", 100 + n) for n in range(5)], max_age_s=3600)
    assert _ids(listing) == [4, 3, 2, 1, 0]
    listing.upserted([_image(9, "b", 500), _image(8, "b", 500)])
    assert _ids(listing) == [8, 9, 4, 3, 2, 1, 0]
    listing.upserted([_image(6, "c", 102)])  # an older date (a re-embed keeps dates): sorted in place
    assert _ids(listing) == [8, 9, 4, 3, 2, 6, 1, 0]


def test_a_failed_first_scan_is_reported_then_tried_again():
    attempts = []

    def flaky_scan():
        attempts.append(1)
        if len(attempts) == 1:
            raise BackendUnavailable("Milvus is down")
        return [_image(1, "a", 10)]

    listing = CollectionListing(flaky_scan)
    with pytest.raises(BackendUnavailable):
        listing.page(BrowseQuery())
    assert _ids(listing) == [1]


def test_the_listing_of_a_real_collection(tmp_path):
    settings = Settings(data_dir=tmp_path)
    index = VectorIndex(settings, toy_model())
    try:
        records = toy_records(30, np.random.default_rng(0), label_of=lambda i: "" if i % 5 == 0 else f"class{i % 2}")
        for i, record in enumerate(records):
            record.created_at = 1_700_000_000 + i
        index.upsert(records[:20])
        page = index.browse(BrowseQuery(limit=5))
        assert page.state == "ready" and page.total == 20
        assert [meta.id for meta in page.images] == [records[i].id for i in (19, 18, 17, 16, 15)]
        assert page.images[0].label == "class1" and page.images[0].source == "file19.jpg"
        index.upsert(records[20:])  # shows without a new scan
        index.delete([records[29].id])
        newest = index.browse(BrowseQuery(limit=3))
        assert newest.total == 29 and [meta.id for meta in newest.images] == [records[i].id for i in (28, 27, 26)]
        unlabelled = index.browse(BrowseQuery(label="", limit=50))
        assert {meta.id for meta in unlabelled.images} == {records[i].id for i in (0, 5, 10, 15, 20, 25)}
        counts = {entry.label: entry.image_count for entry in index.labels().labels}
        assert counts == {"class0": 12, "class1": 11, "": 6}
    finally:
        index.close()

    # Another process's view of the same collection: a fresh listing scanned from Milvus agrees.
    reopened = VectorIndex(settings, toy_model())
    try:
        assert {entry.label: entry.image_count for entry in reopened.labels().labels} == counts
        assert [meta.id for meta in reopened.browse(BrowseQuery(limit=3)).images] == [records[i].id for i in (28, 27, 26)]
    finally:
        reopened.close()


def test_a_started_listing_keeps_the_writes_made_while_its_first_scan_runs():
    """A service starts its listing when its collection is ready: a write made while that first scan runs
    (which may or may not see it) shows on the first page."""
    started, release = threading.Event(), threading.Event()

    def scan():
        started.set()
        release.wait(10)
        return [_image(1, "a", 10)]  # read before the write landed

    listing = CollectionListing(scan)
    listing.start()
    assert started.wait(10)
    listing.upserted([_image(2, "b", 20)])
    listing.start()  # readiness probes call it again: no second scan
    release.set()
    assert _ids(listing) == [2, 1]
