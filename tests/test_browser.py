"""The web page in a real browser: Playwright driving Debian's Chromium against the real service.

Each flow of the page is driven as a person would (click, keyboard, paste, drop, dialogs) and checked
against what the API says. With PAGE_SCREENSHOT_DIR set, the main views are saved there as PNG files
(docs/screenshots/ holds the ones the README shows: `PAGE_SCREENSHOT_DIR=docs/screenshots pytest
tests/test_browser.py`).
"""

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bento.core.ids import content_hash
from scripts.devstack import stack_env
from tests.support import Backend, ServiceProcess, run_cli

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
VERDICT_TEXTS = {"same-image": "Same image", "near-duplicate": "Near duplicate", "similar": "Similar"}
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def screenshot(page, name: str, tmp_path: Path) -> None:
    """Every test keeps its screenshots (a failure's last view); the README's come from PAGE_SCREENSHOT_DIR."""
    folder = Path(os.environ.get("PAGE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def page_service(tmp_path_factory, photo_set, efficientnet, image_host):
    """A service of the page's own (these tests add and delete images): Milvus Lite and a local store over
    the ingested photo set, loopback without keys (as on a laptop), the test image host fetchable."""
    backend = Backend("lite-local", tmp_path_factory.mktemp("page-service"))
    env = backend.process_env(
        RIS_MODEL_NAME="efficientnet-lite0", RIS_FETCH_ALLOW=f"127.0.0.1:{image_host.port}",
        RIS_LIMITS_EXPENSIVE_PER_MINUTE="100000",
    )
    ingest = run_cli(["-m", "ingest", str(photo_set["root"]), "--no-progress", "--json"], env)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    service = ServiceProcess(env, backend.data_dir / "service.log")
    service.start()
    yield service
    service.stop()


@pytest.fixture
def api(page_service):
    with httpx.Client(base_url=page_service.url, timeout=60) as client:
        yield client


def new_page(browser, service, viewport=DESKTOP, bypass_csp=True):
    """A page with its errors collected. Playwright's evaluate and wait_for_function run script the way
    the page's CSP forbids (as it should), so the pages that need them bypass it; the key test, the phone
    test and the private-collection test run the page under its CSP and check that nothing is refused."""
    page = browser.new_page(viewport=viewport, bypass_csp=bypass_csp)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda message: page.errors.append(message.text) if "Content Security Policy" in message.text else None)
    page.goto(service.url + "/")
    page.wait_for_selector("#status:not(:text('connecting'))")
    return page


def hit_ids(page, selector: str = "#results .hit") -> list[str]:
    return [card.get_attribute("data-id") for card in page.locator(selector).all()]


def deliver(page, event: str, data: bytes, name: str, target: str = "document") -> None:
    """Paste (a ClipboardEvent) or drop (a DragEvent) a file, as the browser does for a real one."""
    page.evaluate(
        """([b64, name, event, target]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, { type: "image/jpeg" }));
            const element = target === "document" ? document : document.querySelector(target);
            const made = event === "paste"
                ? new ClipboardEvent("paste", { clipboardData: data, bubbles: true })
                : new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true });
            element.dispatchEvent(made);
        }""",
        [base64.b64encode(data).decode(), name, event, target],
    )


# --- search --------------------------------------------------------------------------------------------


def test_upload_a_photo_and_see_the_result_grid(browser, live_service, photo_set, tmp_path):
    """On both backends (the S3 one serves presigned thumbnail URLs): the original first, with its label,
    verdict, size and score; thumbnails load; results link to the original."""
    query = tmp_path / "my-photo.jpg"
    query.write_bytes(photo_set["queries"]["astronaut"])
    expected = content_hash(photo_set["originals"]["astronaut"])
    page = new_page(browser, live_service)
    assert "images" in page.inner_text("#status") and "efficientnet-lite0" in page.inner_text("#status")

    page.set_input_files("#file", str(query))
    page.wait_for_selector("#results .hit")
    hits = page.locator("#results .hit")
    assert hits.count() == 12
    first = hits.first
    assert first.get_attribute("data-id") == expected
    assert first.locator(".label").inner_text() == "person"
    assert 0.5 < float(first.locator(".score").inner_text()) <= 1.0
    assert first.locator(".verdict").inner_text() in VERDICT_TEXTS.values()
    assert "×" in first.locator(".facts").inner_text() and "KB" in first.locator(".facts").inner_text()
    assert first.locator("a").get_attribute("href") == f"/api/images/{expected}"
    page.wait_for_function("document.querySelector('.hit img').naturalWidth > 0")
    assert "results" in page.inner_text("#timings")
    assert not page.errors, page.errors


def test_load_more_pages_and_min_score_filters(browser, page_service, api, photo_set, tmp_path):
    query = tmp_path / "rocket.jpg"
    query.write_bytes(photo_set["queries"]["rocket"])
    page = new_page(browser, page_service)
    page.fill("#top-k", "5")
    page.set_input_files("#file", str(query))
    page.wait_for_selector("#results .hit")
    assert len(hit_ids(page)) == 5 and page.is_visible("#more")
    page.click("#more")
    page.wait_for_function("document.querySelectorAll('#results .hit').length === 10")
    shown = hit_ids(page)
    expected = api.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["rocket"])}, data={"top_k": "10"}).json()
    assert shown == [hit["id"] for hit in expected["hits"]], "page 2 continues page 1 exactly"
    page.wait_for_function("[...document.querySelectorAll('#results .hit img')].slice(0, 6).every((i) => i.naturalWidth > 0)")
    screenshot(page, "search", tmp_path)

    # A min score keeps only the hits at or above it, and says so when there are none.
    floor = round((expected["hits"][0]["score"] + expected["hits"][1]["score"]) / 2, 3)
    page.fill("#min-score", str(floor))
    page.set_input_files("#file", str(query))
    page.wait_for_function("document.querySelectorAll('#results .hit').length === 1")
    assert hit_ids(page) == [expected["hits"][0]["id"]] and page.is_hidden("#more")
    page.fill("#min-score", "0.9999")
    page.set_input_files("#file", str(query))
    page.wait_for_selector("#message:text('No matches scoring at least 0.9999')")
    assert hit_ids(page) == []
    assert not page.errors, page.errors


def test_paste_drop_and_pasted_url_search(browser, page_service, photo_set, image_host):
    coffee = photo_set["originals"]["coffee"]
    expected = content_hash(coffee)
    page = new_page(browser, page_service)

    deliver(page, "paste", photo_set["queries"]["coffee"], "screenshot.png")
    page.wait_for_function(f"document.querySelector('#results .hit')?.dataset.id === '{expected}'")
    assert page.locator("#drop img").count() == 1, "the pasted image is previewed"

    page.fill("#min-score", "")
    deliver(page, "drop", photo_set["queries"]["astronaut"], "dropped.jpg", target="#drop")
    astronaut = content_hash(photo_set["originals"]["astronaut"])
    page.wait_for_function(f"document.querySelector('#results .hit')?.dataset.id === '{astronaut}'")

    (image_host.root / "pasted.jpg").write_bytes(coffee)
    page.evaluate(
        """(url) => { const data = new DataTransfer(); data.setData("text/plain", url);
        document.body.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true })); }""",
        f"{image_host.url}/pasted.jpg",
    )
    page.wait_for_function(f"document.querySelector('#results .hit')?.dataset.id === '{expected}'")
    assert page.input_value("#url") == f"{image_host.url}/pasted.jpg"
    assert float(page.locator("#results .hit .score").first.inner_text()) > 0.99
    assert not page.errors, page.errors


def test_preview_with_the_keyboard_then_search_with_this(browser, page_service, api, photo_set, tmp_path):
    query = tmp_path / "q.jpg"
    query.write_bytes(photo_set["queries"]["astronaut"])
    page = new_page(browser, page_service)
    page.set_input_files("#file", str(query))
    page.wait_for_selector("#results .hit")
    second = hit_ids(page)[1]
    meta = api.get(f"/api/images/{second}/metadata").json()

    page.locator("#results .hit").nth(1).locator(".open").focus()  # the second hit of the whole answer
    page.keyboard.press("Enter")
    page.wait_for_selector("#preview[open]")
    details = page.inner_text("#preview-meta")
    assert second in details and f"{meta['width']}×{meta['height']} px" in details and meta["source"] in details
    assert page.get_attribute("#preview-open", "href") == f"/api/images/{second}"
    assert page.is_visible("#preview-delete"), "the loopback page may delete"
    page.wait_for_function("document.querySelector('#preview-img').naturalWidth > 0")
    screenshot(page, "preview", tmp_path)
    page.keyboard.press("Escape")
    page.wait_for_selector("#preview", state="hidden")
    assert page.evaluate("document.activeElement.closest('.hit')?.dataset.id") == second, "focus returns to the card"

    page.keyboard.press("Enter")
    page.wait_for_selector("#preview[open]")
    page.keyboard.press("Enter")  # "Search with this" has the focus
    page.wait_for_function(f"document.querySelector('#results .hit')?.dataset.id === '{second}'")
    assert float(page.locator("#results .hit .score").first.inner_text()) > 0.999
    assert page.locator("#results .hit").first.locator(".verdict").inner_text() == "Same image"
    assert not page.errors, page.errors


def test_a_bad_file_shows_a_clear_error(browser, page_service, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image at all")
    page = new_page(browser, page_service)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#message.error")
    assert "not an image" in page.inner_text("#message")


# --- the collection ----------------------------------------------------------------------------------------


def test_gallery_pages_newest_first_and_filters_by_label(browser, page_service, api, tmp_path):
    listing = api.get("/api/images", params={"limit": 200}).json()
    labels = api.get("/api/labels").json()
    page = new_page(browser, page_service)
    page.click("#tab-collection")
    page.wait_for_selector("#gallery .hit")
    assert page.inner_text("#gallery-count").startswith(f"{listing['total']} images")
    assert hit_ids(page, "#gallery .hit") == [image["id"] for image in listing["images"][:24]]
    if listing["total"] > 24:
        page.click("#gallery-more")
        page.wait_for_function("document.querySelectorAll('#gallery .hit').length > 24")
        assert hit_ids(page, "#gallery .hit") == [image["id"] for image in listing["images"][:48]]

    options = page.locator("#gallery-label option").all_inner_texts()
    assert options[1:] == [f"{entry['label'] or '(no label)'} ({entry['image_count']})" for entry in labels["labels"]]
    chosen = labels["labels"][-1]
    page.select_option("#gallery-label", chosen["label"])
    page.wait_for_function(f"document.querySelector('#gallery-count').textContent.startsWith('{chosen['image_count']} images')")
    assert {page.locator(".label").nth(i).inner_text() for i in range(chosen["image_count"])} == {chosen["label"]}
    assert page.locator("#labels-list option").count() == len([e for e in labels["labels"] if e["label"]])
    assert not page.errors, page.errors


def test_multi_file_upload_reports_each_file(browser, page_service, api, photo_set, tmp_path):
    new = tmp_path / "new-photo.jpg"
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_set["originals"]["rocket"])).rotate(90, expand=True).save(buffer, "JPEG", quality=90)
    new.write_bytes(buffer.getvalue())
    present = tmp_path / "coffee-again.jpg"
    present.write_bytes(photo_set["originals"]["coffee"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    before = api.get("/api/status").json()["image_count"]

    page = new_page(browser, page_service)
    page.goto(page_service.url + "/#collection")
    page.wait_for_selector("#gallery .hit")
    page.fill("#upload-label", "rockets sideways")
    page.set_input_files("#upload-files", [str(new), str(present), str(broken)])
    page.wait_for_selector("#upload-summary:text('1 added, 1 already present, 1 rejected')")
    rows = page.locator("#upload-results li")
    assert rows.nth(0).inner_text().split("\n") == ["new-photo.jpg", "added"]
    assert rows.nth(1).inner_text().split("\n") == ["coffee-again.jpg", "already present"]
    assert rows.nth(2).inner_text().startswith("broken.jpg") and "rejected:" in rows.nth(2).inner_text()
    assert page.get_attribute("#upload-progress", "value") == "3"
    new_id = content_hash(new.read_bytes())
    page.wait_for_function(f"document.querySelector('#gallery .hit')?.dataset.id === '{new_id}'")
    assert page.locator("#gallery .hit .label").first.inner_text() == "rockets sideways"
    page.wait_for_selector("#gallery-label option[value='rockets sideways']", state="attached")
    assert api.get("/api/status").json()["image_count"] == before + 1
    screenshot(page, "collection", tmp_path)
    assert not page.errors, page.errors


def test_delete_from_the_preview_after_confirming(browser, page_service, api, photo_set, tmp_path):
    data = photo_set["originals"]["rocket"]
    victim = tmp_path / "to-delete.png"
    Image.open(io.BytesIO(data)).resize((200, 150)).save(victim, "PNG")
    victim_id = api.post("/api/images", files={"file": ("to-delete.png", victim.read_bytes())}, data={"label": "doomed"}).json()["id"]
    page = new_page(browser, page_service)
    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss() if len(asked) == 1 else dialog.accept()

    page.on("dialog", answer)
    page.click("#tab-collection")
    page.wait_for_selector(f"#gallery .hit[data-id='{victim_id}']")
    page.click(f"#gallery .hit[data-id='{victim_id}'] .open")
    page.wait_for_selector("#preview[open]")
    page.click("#preview-delete")  # the first confirmation is dismissed: nothing happens
    assert len(asked) == 1 and "cannot be undone" in asked[0]
    assert api.get(f"/api/images/{victim_id}/metadata").status_code == 200
    page.click("#preview-delete")
    page.wait_for_selector(f"#gallery .hit[data-id='{victim_id}']", state="detached")
    assert page.is_hidden("#preview")
    assert api.get(f"/api/images/{victim_id}/metadata").status_code == 404
    assert not page.errors, page.errors


# --- duplicates ------------------------------------------------------------------------------------------


def test_review_duplicates_keep_one_delete_the_others(browser, page_service, api, photo_set, tmp_path):
    """Two more copies of one photo with the same pixels (PNG files of different compression: other bytes,
    so other ids) make an exact group; the reviewer keeps the second and deletes the rest."""
    pixels = Image.open(io.BytesIO(photo_set["originals"]["camera"])).convert("RGB")
    ids = []
    for level in (1, 9):
        buffer = io.BytesIO()
        pixels.save(buffer, "PNG", compress_level=level)
        answer = api.post("/api/images", files={"file": (f"camera-{level}.png", buffer.getvalue())}, data={"label": "dupes"})
        assert answer.status_code == 201, answer.text
        ids.append(answer.json()["id"])
    page = new_page(browser, page_service)
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#tab-duplicates")
    page.click("#dup-scan")  # a fresh scan: the report may predate the copies
    group = page.locator("fieldset.group", has=page.locator(f".member[data-id='{ids[0]}']"))
    group.wait_for(timeout=60_000)
    assert "Exact duplicates" in group.locator("legend").inner_text()
    members = [member.get_attribute("data-id") for member in group.locator(".member").all()]
    assert set(ids) <= set(members)
    page.wait_for_function("[...document.querySelectorAll('.member .facts')].every((f) => f.textContent.includes('×'))")
    screenshot(page, "duplicates", tmp_path)

    group.locator(f".member[data-id='{ids[1]}'] input").check()
    group.locator("button.danger").click()
    page.wait_for_selector("fieldset.group.resolved")
    assert api.get(f"/api/images/{ids[1]}/metadata").status_code == 200
    for other in set(members) - {ids[1]}:
        assert api.get(f"/api/images/{other}/metadata").status_code == 404
    assert not page.errors, page.errors


# --- keys, failures, small screens -----------------------------------------------------------------------


def test_the_page_asks_for_a_key_only_when_an_action_needs_one(browser, keyed_service, keys, photo_set, tmp_path):
    """Under the page's CSP: searching needs no key; adding asks once (naming the scope), then works; a
    wrong key is refused in the page and forgotten; the preview offers delete only as needing a key."""
    query = tmp_path / "rocket.jpg"
    query.write_bytes(photo_set["originals"]["rocket"])
    page = new_page(browser, keyed_service, bypass_csp=False)
    prompts: list[str] = []
    answers = iter(["not-a-key", keys.write])
    page.on("dialog", lambda dialog: (prompts.append(dialog.message), dialog.accept(next(answers))))

    page.set_input_files("#file", str(query))
    page.wait_for_selector("#message:not(:text('Searching'))")
    assert not prompts, "searching must not ask for a key"
    page.click("#add")
    page.wait_for_selector("#message.error")
    assert len(prompts) == 1 and "write" in prompts[0]
    assert "key" in page.inner_text("#message").lower()
    page.click("#add")  # the wrong key was forgotten: asked again
    page.wait_for_selector("#message:text('Added as')")
    assert len(prompts) == 2
    page.click("#add")  # the key is remembered for the session
    page.wait_for_selector("#message:text('Already in the collection')")
    assert len(prompts) == 2
    assert page.inner_text("#key-button") == "API key: set"
    assert not page.errors, page.errors


def test_api_docs_render_under_the_csp_and_try_it_out_works_with_a_key(browser, keyed_service, keys, tmp_path):
    """/docs in a browser under the service's CSP: Swagger UI (served from here) lists the operations, and
    with the admin key entered under Authorize, "Try it out" on GET /api/status answers 200 as an admin."""
    page = new_page(browser, keyed_service, bypass_csp=False)
    page.goto(keyed_service.url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/api/search", "/api/images", "/api/status", "/api/embed"} <= {p.strip() for p in paths}, paths

    page.click("button.authorize")
    api_key = page.locator(".auth-container", has_text="X-API-Key")
    api_key.locator("input").fill(keys.admin)
    api_key.locator("button.authorize").click()
    page.click("button.btn-done")
    status = page.locator(".opblock-get", has=page.locator(".opblock-summary-path", has_text="/api/status")).first
    status.locator(".opblock-summary").click()
    status.locator("button.try-out__btn").click()
    status.locator("button.execute").click()
    answer = status.locator(".live-responses-table tbody .response-col_status").first
    answer.wait_for(timeout=60_000)
    assert answer.inner_text().strip() == "200"
    body = status.locator(".live-responses-table tbody .response-col_description").first.inner_text()
    assert '"admin"' in body and '"ready"' in body, body[:500]
    screenshot(page, "api-docs", tmp_path)
    assert not page.errors, page.errors


def test_a_private_collection_shows_its_images_to_a_key_holder(browser, efficientnet, keys, photo_set, tmp_path):
    """With no anonymous access at all, <img> tags cannot send a key: the page fetches thumbnails, the
    preview and originals with the key (blob: URLs), under the CSP."""
    from bento.http.auth import hash_key

    entries = f"reader:search:{hash_key(keys.search)}, ops:admin:{hash_key(keys.admin)}"
    env = Backend("lite-local", tmp_path / "data").process_env(
        RIS_MODEL_NAME="efficientnet-lite0", RIS_AUTH_KEYS=entries, RIS_AUTH_ANONYMOUS_SCOPES="",
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60, headers={"X-API-Key": keys.admin}) as client:
            coffee = client.post("/api/images", files={"file": ("coffee.jpg", photo_set["originals"]["coffee"])}, data={"label": "coffee"})
            assert coffee.status_code == 201
            assert httpx.get(f"{service.url}/api/images/{coffee.json()['id']}/thumbnail").status_code == 401
        page = new_page(browser, service, bypass_csp=False)
        assert page.inner_text("#status").startswith("status unavailable")
        page.on("dialog", lambda dialog: dialog.accept(keys.search))
        page.click("#key-button")
        page.wait_for_selector("#status:text('1 image ·')")
        page.click("#tab-collection")
        page.wait_for_selector("#gallery .hit img[src^='blob:']")
        assert page.evaluate("document.querySelector('#gallery .hit img').naturalWidth") > 0
        page.click("#gallery .hit .open")
        page.wait_for_selector("#preview-img[src^='blob:']")
        assert page.inner_text("#preview-delete") == "Delete (needs a write key)"
        assert not page.errors, page.errors
    finally:
        service.stop()


def test_a_backend_outage_is_shown_in_the_page_and_recovers(browser, milvus_server, s3_server, efficientnet, photo_set, tmp_path):
    backend = Backend("server-s3", tmp_path / "data", stack_env(milvus_server, s3_server, bucket="page-outage", collection="page_outage"))
    service = ServiceProcess(backend.process_env(RIS_MODEL_NAME="efficientnet-lite0", RIS_MILVUS_TIMEOUT_S="3"), tmp_path / "service.log")
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            data = photo_set["originals"]["coffee"]
            image_id = client.post("/api/images", files={"file": ("coffee.jpg", data)}).json()["id"]
        query = tmp_path / "q.jpg"
        query.write_bytes(photo_set["queries"]["coffee"])
        page = new_page(browser, service)
        milvus_server.pause()
        try:
            page.set_input_files("#file", str(query))
            page.wait_for_selector("#message.error", timeout=60_000)
            assert "milvus" in page.inner_text("#message").lower(), "the laptop's own user (all scopes) reads why"
            page.click("#tab-collection")
            page.wait_for_selector("#gallery-message.error", timeout=60_000)
            screenshot(page, "outage", tmp_path)
        finally:
            milvus_server.resume()
        page.click("#tab-search")
        page.set_input_files("#file", str(query))
        page.wait_for_function(f"document.querySelector('#results .hit')?.dataset.id === '{image_id}'", timeout=60_000)
        assert page.inner_text("#message") == ""
    finally:
        service.stop()


def test_phone_sized_screen_has_no_sideways_scrolling(browser, page_service, photo_set, tmp_path):
    query = tmp_path / "q.jpg"
    query.write_bytes(photo_set["queries"]["astronaut"])
    page = new_page(browser, page_service, viewport=PHONE, bypass_csp=False)
    page.set_input_files("#file", str(query))
    page.wait_for_selector("#results .hit img")
    fits = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(fits), "the search view scrolls sideways on a phone"
    screenshot(page, "phone-search", tmp_path)
    for view in ("collection", "duplicates"):
        page.click(f"#tab-{view}")
        page.wait_for_selector(f"#view-{view}:not([hidden])")
        assert page.evaluate(fits), f"the {view} view scrolls sideways on a phone"
    page.click("#tab-search")
    page.click("#results .hit .open")
    page.wait_for_selector("#preview[open]")
    box = page.locator("#preview").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert not page.errors, page.errors
