"""The web page in a real browser: Playwright driving Debian's Chromium."""

import shutil

import pytest

from bento.imaging import content_hash

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield instance
        instance.close()


def test_upload_a_photo_and_see_the_result_grid(browser, live_service, photo_set, tmp_path):
    query = tmp_path / "my-photo.jpg"
    query.write_bytes(photo_set["queries"]["astronaut"])
    expected = content_hash(photo_set["originals"]["astronaut"])

    # Playwright's wait_for_function polls with eval, which the page's CSP forbids (as it should): this page
    # lets the test's own probes through; test_the_page_asks_for_a_key... runs the page under its CSP.
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(live_service.url + "/")
    page.wait_for_selector("#status:not(:text('connecting'))")
    assert "images" in page.inner_text("#status") and "efficientnet-lite0" in page.inner_text("#status")

    page.set_input_files("#file", str(query))
    page.wait_for_selector(".hit")
    hits = page.locator(".hit")
    assert hits.count() == 12
    first = hits.first
    assert first.get_attribute("data-id") == expected
    assert first.locator(".label").inner_text() == "person"
    assert 0.5 < float(first.locator(".score").inner_text()) <= 1.0
    # Thumbnails really load (naturalWidth > 0 once decoded).
    page.wait_for_function("document.querySelector('.hit img').naturalWidth > 0")
    page.screenshot(path=str(tmp_path / "results.png"), full_page=True)

    # Clicking a result searches with that image: it comes back first with score ~1.
    second_id = hits.nth(1).get_attribute("data-id")
    hits.nth(1).click()
    page.wait_for_function(f"document.querySelector('.hit').dataset.id === '{second_id}'")
    assert float(page.locator(".hit .score").first.inner_text()) > 0.99
    assert "results" in page.inner_text("#timings")
    assert not errors, errors


def test_page_shows_a_clear_error_for_a_bad_file(browser, live_service, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image at all")
    page = browser.new_page()
    page.goto(live_service.url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#message.error")
    assert "not an image" in page.inner_text("#message")


def test_the_page_asks_for_a_key_only_when_an_action_needs_one(browser, keyed_service, keys, photo_set, tmp_path):
    """Searching needs no key; adding asks once (naming the scope), then works; no CSP violation."""
    query = tmp_path / "rocket.jpg"
    query.write_bytes(photo_set["originals"]["rocket"])
    page = browser.new_page()
    prompts: list[str] = []
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))

    def answer(dialog) -> None:
        prompts.append(dialog.message)
        dialog.accept(keys.write)

    page.on("dialog", answer)
    page.goto(keyed_service.url + "/")
    page.set_input_files("#file", str(query))
    page.wait_for_selector("#message:not(:text('Searching'))")
    assert not prompts, "searching must not ask for a key"
    page.click("#add")
    page.wait_for_selector("#message:text('Added as')")
    assert len(prompts) == 1 and "write" in prompts[0]
    page.click("#add")  # the key is remembered for the session
    page.wait_for_selector("#message:text('Already in the collection')")
    assert len(prompts) == 1
    assert not [text for text in console if "Content Security Policy" in text], console
