"""RIS_VERDICT_* reach every answer of the running service: /api/status, the verdicts of a search and the
duplicate groups. (The HTTP service once built its catalog by hand without them, and ignored them.)"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import Backend, ServiceProcess

pytestmark = pytest.mark.slow

SAME_IMAGE = 0.999  # an edited copy never scores this: it can only be a near duplicate
NEAR_DUPLICATE = 0.31
SIMILAR = 0.27


def test_verdict_settings_reach_status_search_and_duplicates(efficientnet, sscd, photo_set, tmp_path):
    env = Backend("lite-local", tmp_path / "data").process_env(
        RIS_MODEL_NAME="efficientnet-lite0",
        RIS_VERDICT_SAME_IMAGE=str(SAME_IMAGE),
        RIS_VERDICT_NEAR_DUPLICATE=str(NEAR_DUPLICATE),
        RIS_VERDICT_SIMILAR=str(SIMILAR),
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=120) as client:
            thresholds = client.get("/api/status").json()["thresholds"]
            assert (thresholds["same_image"], thresholds["near_duplicate"], thresholds["similar"]) == (
                SAME_IMAGE, NEAR_DUPLICATE, SIMILAR,
            ), thresholds
            assert thresholds["copy_model"] is True  # the packaged SSCD student serves beside the similarity model

            original = photo_set["originals"]["rocket"]
            edited = photo_set["queries"]["rocket"]
            ids = [client.post("/api/images", files={"file": (f"{n}.jpg", data)}).json()["id"] for n, data in (("rocket", original), ("copy", edited))]
            client.post("/api/images", files={"file": ("coffee.jpg", photo_set["originals"]["coffee"])}).raise_for_status()

            hits = client.post("/api/search", files={"file": ("q.jpg", edited)}, data={"top_k": "3"}).json()["hits"]
            original_hit = next(hit for hit in hits if hit["id"] == ids[0])
            assert original_hit["verdict"] == "near-duplicate", original_hit
            assert NEAR_DUPLICATE <= original_hit["score"] < SAME_IMAGE

            deadline = time.monotonic() + 120
            while (page := client.get("/api/duplicates")).status_code == 202 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert page.status_code == 200, page.text
            report = page.json()
            assert report["report"]["near_duplicate_threshold"] == NEAR_DUPLICATE
            groups = [sorted(member["id"] for member in group["members"]) for group in report["groups"]]
            assert sorted(ids) in groups, groups
            for group in report["groups"]:
                assert all(member["score"] >= NEAR_DUPLICATE for member in group["members"]), group
    finally:
        service.stop()
