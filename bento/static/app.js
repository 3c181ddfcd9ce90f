"use strict";
// The web page: search (file, drop, paste, URL), a gallery with multi-file upload, and a duplicate review.
// No framework: three views switched by the URL's hash, one preview dialog, and the JSON API.
const $ = (id) => document.getElementById(id);

// --- talking to the API ---------------------------------------------------------------------------
// API keys: asked for only when an action needs one (the service answers 401/403 and names the scope),
// kept for this browser session only, and sent as X-API-Key.
const KEY_ITEM = "ris-api-key";

class ApiError extends Error {
  constructor(message, status, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function describeProblem(response, body) {
  const detail = body.detail && typeof body.detail === "object" ? JSON.stringify(body.detail) : body.detail;
  if (detail) return String(detail);
  if (response.status === 502 || response.status === 503 || response.status === 504) return "The service is unavailable; try again shortly.";
  return body.error || "HTTP " + response.status;
}

// quiet: never ask for a key (the status line and the label list only read what they may).
async function api(path, options, retried) {
  const { quiet, ...opts } = options || {};
  const key = sessionStorage.getItem(KEY_ITEM);
  opts.headers = Object.assign({}, opts.headers || {}, key ? { "X-API-Key": key } : {});
  let response;
  try {
    response = await fetch(path, opts);
  } catch (e) {
    throw new ApiError("Cannot reach the service (" + e.message + ").", 0, 0);
  }
  const body = await response.json().catch(() => ({}));
  if (response.ok) return body;
  const detail = describeProblem(response, body);
  const needsKey = response.status === 401 || (response.status === 403 && body.error === "forbidden" && key);
  if (needsKey && !retried && !quiet) {
    const scope = (detail.match(/'(search|write|admin)'/) || [])[1] || "the right";
    const entered = window.prompt(`${detail}\nEnter an API key with ${scope} scope:`);
    if (entered && entered.trim()) {
      sessionStorage.setItem(KEY_ITEM, entered.trim());
      refreshStatus();
      return api(path, options, true);
    }
  }
  if (response.status === 401 && retried) sessionStorage.removeItem(KEY_ITEM);
  throw new ApiError(detail, response.status, parseInt(response.headers.get("Retry-After") || "0", 10));
}

const jsonPost = (body) => ({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function say(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
}

function formatBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(0) + " KB";
  return (n / 1024 / 1024).toFixed(1) + " MB";
}

// Images of the service: an <img> or a link cannot send the key, so where a key is in use (a collection
// that anonymous visitors may not see) the bytes are fetched with it and shown from a blob: URL.
// Presigned S3 URLs (absolute) carry their own signature.
const keyedImages = () => Boolean(sessionStorage.getItem(KEY_ITEM));
const ownUrl = (url) => url.startsWith("/");

async function blobUrl(url) {
  const response = await fetch(url, { headers: { "X-API-Key": sessionStorage.getItem(KEY_ITEM) || "" } });
  if (!response.ok) throw new ApiError("HTTP " + response.status, response.status, 0);
  return URL.createObjectURL(await response.blob());
}

function showImage(img, url) {
  if (!(ownUrl(url) && keyedImages())) { img.src = url; return; }
  blobUrl(url).then((src) => { img.src = src; }).catch(() => { img.alt = "(cannot load: " + img.alt + ")"; });
}

function openOriginal(link, url) {
  link.href = url;
  link.addEventListener("click", async (e) => {
    e.stopPropagation();
    if (!(ownUrl(url) && keyedImages())) return; // the browser opens it
    e.preventDefault();
    const tab = window.open("", "_blank");
    try { tab.location = await blobUrl(url); } catch (err) { tab.close(); }
  });
}

const VERDICTS = { "same-image": "Same image", "near-duplicate": "Near duplicate", "similar": "Similar", unrelated: "Unrelated" };

// --- status, scopes and labels ----------------------------------------------------------------------
let status = null;

const may = (scope) => Boolean(status && status.scopes && status.scopes.includes(scope));
// An action is offered when the caller may do it, or when a key could allow it (the page then asks).
const offered = (scope) => may(scope) || Boolean(status && status.keys);

async function refreshStatus() {
  try {
    status = await api("/api/status", { quiet: true });
    const m = status.model;
    $("status").textContent = `${status.image_count} image${status.image_count === 1 ? "" : "s"} · model ${m.backbone} (${m.pretrained ? m.weights : "random weights"}) · ${status.index.index_type} · ${status.milvus_backend}`
      + (status.ready ? "" : " · NOT READY: " + status.error);
  } catch (e) {
    $("status").textContent = "status unavailable: " + e.message;
  }
  $("key-button").textContent = sessionStorage.getItem(KEY_ITEM) ? "API key: set" : "API key";
}

let labels = [];
let collectionImageCount = 0;

async function refreshLabels() {
  try {
    const all = [];
    let answer = { next_offset: 0 };
    while (answer.next_offset !== null) {
      answer = await api(`/api/labels?offset=${answer.next_offset}&limit=1000`, { quiet: true });
      if (answer.state !== "ready") { setTimeout(refreshLabels, 2000); return; }
      all.push(...answer.labels);
    }
    labels = all;
    collectionImageCount = answer.image_count;
  } catch (e) {
    return; // the label list is a convenience: the views show their own errors
  }
  $("labels-list").replaceChildren(...labels.filter((l) => l.label).map((l) => new Option(`${l.image_count} images`, l.label)));
  const select = $("gallery-label");
  const chosen = select.value;
  const options = [new Option(`all (${collectionImageCount})`, "*")];
  for (const l of labels) options.push(new Option(`${l.label || "(no label)"} (${l.image_count})`, l.label));
  select.replaceChildren(...options);
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "*";
}

$("key-button").addEventListener("click", () => {
  const scopes = status && status.scopes && status.scopes.length ? status.scopes.join(", ") : "none";
  const entered = window.prompt(`Your current access: ${scopes}.\nEnter an API key for this browser session (empty to forget the key):`, "");
  if (entered === null) return;
  if (entered.trim()) sessionStorage.setItem(KEY_ITEM, entered.trim());
  else sessionStorage.removeItem(KEY_ITEM);
  refreshStatus();
});

// --- image cards and the preview dialog ----------------------------------------------------------------
function card(image, onOpen) {
  const wrapper = document.createElement("div");
  wrapper.className = "hit";
  wrapper.dataset.id = image.id;
  wrapper.dataset.testid = "hit";
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.title = "Details";
  const img = document.createElement("img");
  img.alt = image.label || "image " + image.id.slice(0, 8);
  showImage(img, image.thumbnail_url);
  img.loading = "lazy";
  const meta = document.createElement("span");
  meta.className = "meta";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = image.label || "(no label)";
  meta.append(label);
  if (image.score !== undefined) {
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = image.score.toFixed(3);
    meta.append(score);
  }
  const facts = document.createElement("span");
  facts.className = "facts";
  facts.textContent = `${image.width}×${image.height} · ${formatBytes(image.size_bytes)}`;
  open.append(img, meta, facts);
  if (image.verdict) {
    const verdict = document.createElement("span");
    verdict.className = "verdict " + image.verdict;
    verdict.textContent = VERDICTS[image.verdict] || image.verdict;
    open.append(verdict);
  }
  open.addEventListener("click", () => onOpen(image));
  const link = document.createElement("a");
  link.target = "_blank";
  link.rel = "noopener";
  link.textContent = "original";
  openOriginal(link, image.image_url);
  wrapper.append(open, link);
  return wrapper;
}

let previewed = null;
let previewOpener = null;

function openPreview(image) {
  previewed = image;
  previewOpener = document.activeElement;
  $("preview-img").removeAttribute("src");
  showImage($("preview-img"), image.image_url);
  $("preview-img").alt = image.label || "image " + image.id.slice(0, 8);
  $("preview-title").textContent = image.label || "(no label)";
  const rows = [
    ["Score", image.score !== undefined ? image.score.toFixed(4) + (image.verdict ? " · " + VERDICTS[image.verdict] : "") : null],
    ["Size", `${image.width}×${image.height} px · ${formatBytes(image.size_bytes)} · ${image.mime}`],
    ["Added", image.created_at ? new Date(image.created_at).toLocaleString() : null],
    ["Source", image.source || null],
    ["Id", image.id],
  ];
  const list = $("preview-meta");
  list.replaceChildren();
  for (const [name, value] of rows) {
    if (value === null) continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
  const open = $("preview-open").cloneNode(true); // a fresh element: no click handler of an earlier image
  $("preview-open").replaceWith(open);
  openOriginal(open, image.image_url);
  const deletable = offered("write");
  $("preview-delete").hidden = !deletable;
  $("preview-delete").textContent = may("write") ? "Delete" : "Delete (needs a write key)";
  say($("preview-message"), "", false);
  $("preview").showModal();
  $("preview-search").focus();
}

function closePreview() {
  $("preview").close();
}

$("preview").addEventListener("close", () => { if (previewOpener && previewOpener.isConnected) previewOpener.focus(); });
$("preview-close").addEventListener("click", closePreview);
$("preview").addEventListener("click", (e) => { if (e.target === $("preview")) closePreview(); });
$("preview-search").addEventListener("click", () => {
  const image = previewed;
  closePreview();
  location.hash = "#search";
  searchById(image.id, image.thumbnail_url);
});
$("preview-delete").addEventListener("click", async () => {
  const image = previewed;
  if (!window.confirm(`Delete this image (${image.label || "no label"}, ${image.width}×${image.height}) from the collection? This cannot be undone.`)) return;
  try {
    await api(`/api/images/${image.id}`, { method: "DELETE" });
  } catch (e) {
    say($("preview-message"), e.message, true);
    return;
  }
  closePreview();
  document.querySelectorAll(`.hit[data-id="${image.id}"]`).forEach((el) => {
    // The next "load more" starts where the server's list now continues: one image earlier.
    const grid = el.parentElement;
    if (grid.id === "copies" || grid.id === "similar") shown -= 1;
    if (grid.id === "gallery") galleryShown -= 1;
    el.remove();
    if (grid.closest(".hits") && !grid.children.length) grid.closest(".hits").hidden = true;
  });
  say(currentMessage(), "Deleted.", false);
  refreshStatus();
  refreshLabels();
});

// --- search -----------------------------------------------------------------------------------------
let query = null; // {kind: "file"|"id"|"url", value, preview}
let shown = 0;
// Each view's requests carry a ticket: an answer to an older request (the user has moved on) is dropped.
const tickets = { search: 0, gallery: 0, duplicates: 0 };
let lastFile = null;

function searchOptions() {
  const pageSize = Math.min(200, Math.max(1, parseInt($("top-k").value, 10) || 12));
  const label = $("label").value.trim();
  const minScore = $("min-score").value.trim();
  const options = { top_k: pageSize, label: label || null };
  if (minScore !== "") options.min_score = parseFloat(minScore);
  return options;
}

function preview(src) {
  // The instructions stay (the drop zone is still one). No preview (null) for a plain-http URL: the CSP
  // allows remote images over https only, and the service fetches the URL anyway.
  const text = $("drop-text");
  text.textContent = "Drop, paste or click for another photo";
  $("drop").replaceChildren(text);
  if (!src) return;
  const img = document.createElement("img");
  img.alt = "query image";
  showImage(img, src);
  $("drop").prepend(img);
}

async function runSearch(offset) {
  const options = { ...query.options, offset }; // the options of the search it continues
  if (query.kind === "file") {
    const form = new FormData();
    form.append("file", query.value);
    for (const [name, value] of Object.entries(options)) if (value !== null && value !== undefined) form.append(name, value);
    return api("/api/search", { method: "POST", body: form });
  }
  if (query.kind === "id") return api("/api/search/id", jsonPost({ id: query.value, ...options }));
  return api("/api/search/url", jsonPost({ url: query.value, ...options }));
}

async function search(newQuery) {
  query = { ...newQuery, options: searchOptions() };
  shown = 0;
  preview(query.preview);
  $("add").disabled = query.kind !== "file";
  clearResults();
  $("more").hidden = true;
  say($("message"), query.kind === "url" ? "Fetching and searching…" : "Searching…", false);
  $("timings").textContent = "";
  const ticket = ++tickets.search;
  try {
    const result = await runSearch(0);
    if (ticket === tickets.search) render(result, false);
  } catch (e) {
    if (ticket === tickets.search) say($("message"), e.message, true);
  }
}

async function loadMore() {
  $("more").disabled = true;
  const ticket = tickets.search;
  try {
    const result = await runSearch(shown);
    if (ticket === tickets.search) render(result, true);
  } catch (e) {
    if (ticket !== tickets.search) return;
    say($("message"), e.message, true);
    $("more").hidden = true;
  } finally {
    $("more").disabled = false;
  }
}

// Copies and edits (the copy model's hits) above similar images (the similarity model's); a page of hits
// holds the copies first, so appending keeps both lists in order.
function clearResults() {
  for (const name of ["copies", "similar"]) {
    $(name).replaceChildren();
    $(name + "-section").hidden = true;
  }
}

function render(result, append) {
  if (!append) clearResults();
  for (const hit of result.hits) {
    const name = hit.match === "copy" ? "copies" : "similar";
    $(name).append(card(hit, openPreview));
    $(name + "-section").hidden = false;
  }
  shown += result.hits.length;
  $("more").hidden = result.hits.length < result.top_k;
  const t = result.timings;
  $("timings").textContent =
    `${shown} results · decode ${t.decode_ms} ms · embed ${t.embed_ms} ms · search ${t.search_ms} ms · total ${t.total_ms} ms`;
  const floor = result.min_score !== null && result.min_score !== undefined ? ` scoring at least ${result.min_score}` : "";
  say($("message"), shown ? "" : `No matches${floor}.`, false);
}

function searchFile(file) {
  lastFile = file;
  return search({ kind: "file", value: file, preview: URL.createObjectURL(file) });
}

function searchById(id, thumbnailUrl) {
  lastFile = null;
  window.scrollTo({ top: 0, behavior: "smooth" });
  return search({ kind: "id", value: id, preview: thumbnailUrl });
}

function searchUrl() {
  const url = $("url").value.trim();
  if (!url) return;
  lastFile = null;
  search({ kind: "url", value: url, preview: url.startsWith("https:") ? url : null });
}

async function addImage() {
  if (!lastFile) return;
  const form = new FormData();
  form.append("file", lastFile);
  const label = $("add-label").value.trim();
  if (label) form.append("label", label);
  try {
    const r = await api("/api/images", { method: "POST", body: form });
    say($("message"), r.created ? `Added as ${r.id.slice(0, 12)}…` : "Already in the collection; nothing changed.", false);
    refreshStatus();
    refreshLabels();
  } catch (e) { say($("message"), e.message, true); }
}

// --- the collection: gallery and multi-file upload ---------------------------------------------------------
const GALLERY_PAGE = 24;
let galleryShown = 0;

async function loadGallery(append, ticket) {
  if (ticket === undefined) ticket = ++tickets.gallery;
  const chosen = $("gallery-label").value;
  const offset = append ? galleryShown : 0;
  const params = new URLSearchParams({ offset, limit: GALLERY_PAGE });
  if (chosen !== "*") params.set("label", chosen);
  if (!append) { galleryShown = 0; $("gallery").replaceChildren(); }
  $("gallery-more").hidden = true;
  say($("gallery-message"), "Loading…", false);
  let page;
  try {
    page = await api("/api/images?" + params);
  } catch (e) {
    if (ticket === tickets.gallery) say($("gallery-message"), e.message, true);
    return;
  }
  if (ticket !== tickets.gallery) return;
  if (page.state !== "ready") {
    say($("gallery-message"), "Reading the collection's listing…", false);
    setTimeout(() => loadGallery(append, ticket), 1500);
    return;
  }
  for (const image of page.images) $("gallery").append(card(image, openPreview));
  galleryShown = offset + page.images.length;
  $("gallery-count").textContent = `${page.total} images, newest first`;
  $("gallery-more").hidden = galleryShown >= page.total;
  say($("gallery-message"), page.total ? "" : "No images yet: drop some above.", false);
}

async function uploadOne(file, label, row) {
  const form = new FormData();
  form.append("file", file);
  if (label) form.append("label", label);
  for (;;) {
    try {
      const r = await api("/api/images", { method: "POST", body: form });
      row.className = r.created ? "added" : "present";
      row.lastChild.textContent = r.created ? "added" : "already present";
      return r.created;
    } catch (e) {
      if (e.status === 429) { // the per-client limit: wait as told, then go on
        row.lastChild.textContent = `waiting ${e.retryAfter || 5} s (rate limit)…`;
        await sleep(1000 * (e.retryAfter || 5));
        continue;
      }
      row.className = "rejected";
      row.lastChild.textContent = "rejected: " + e.message;
      return e;
    }
  }
}

// One batch at a time: files dropped while a batch runs wait for it.
let uploads = Promise.resolve();

function uploadFiles(files) {
  if (!files.length) return uploads;
  uploads = uploads.then(() => uploadBatch(files));
  return uploads;
}

async function uploadBatch(files) {
  location.hash = "#collection";
  const label = $("upload-label").value.trim();
  const progress = $("upload-progress");
  const list = $("upload-results");
  list.replaceChildren();
  progress.hidden = false;
  progress.max = files.length;
  progress.value = 0;
  const rows = files.map((file) => {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = file.name || "pasted image";
    const outcome = document.createElement("span");
    outcome.className = "outcome";
    outcome.textContent = "waiting";
    row.append(name, outcome);
    list.append(row);
    return row;
  });
  const counts = { added: 0, present: 0, rejected: 0 };
  let refused = null; // no key (or the wrong one): the files behind it are not tried, nor asked for again
  for (let i = 0; i < files.length; i++) {
    say($("upload-summary"), `Uploading ${i + 1} of ${files.length}…`, false);
    let outcome;
    if (refused) {
      rows[i].className = "rejected";
      rows[i].lastChild.textContent = "rejected: " + refused.message;
      outcome = refused;
    } else {
      rows[i].lastChild.textContent = "uploading…";
      outcome = await uploadOne(files[i], label, rows[i]);
    }
    if (outcome instanceof ApiError && (outcome.status === 401 || outcome.status === 403)) refused = outcome;
    counts[outcome instanceof Error ? "rejected" : outcome ? "added" : "present"] += 1;
    progress.value = i + 1;
  }
  say($("upload-summary"), `${counts.added} added, ${counts.present} already present, ${counts.rejected} rejected.`, counts.rejected > 0);
  refreshStatus();
  await refreshLabels();
  loadGallery(false);
}

// --- duplicates -------------------------------------------------------------------------------------
const DUPLICATE_PAGE = 10;
let dupShown = 0;
let groupNumber = 0; // an image can be in an exact and a near group: each group's radios are their own

async function loadDuplicates(append, refresh, ticket) {
  if (ticket === undefined) ticket = ++tickets.duplicates;
  const offset = append ? dupShown : 0;
  if (!append) { dupShown = 0; $("dup-groups").replaceChildren(); }
  $("dup-more").hidden = true;
  say($("dup-message"), "Looking for duplicates…", false);
  let page;
  try {
    page = await api(`/api/duplicates?offset=${offset}&limit=${DUPLICATE_PAGE}` + (refresh ? "&refresh=true" : ""));
  } catch (e) {
    if (ticket === tickets.duplicates) say($("dup-message"), e.message, true);
    return;
  }
  if (ticket !== tickets.duplicates) return;
  if (page.state !== "ready") {
    say($("dup-message"), "Scanning the collection for duplicates…", false);
    setTimeout(() => loadDuplicates(append, false, ticket), 1500);
    return;
  }
  const report = page.report;
  $("dup-summary").textContent = `${report.image_count} images · ${report.exact_groups} exact and ${report.near_groups} near-duplicate groups (score ≥ ${report.near_duplicate_threshold}) · compared in ${(report.compare_ms / 1000).toFixed(1)} s`;
  for (const group of page.groups) $("dup-groups").append(groupView(group));
  dupShown = offset + page.groups.length;
  $("dup-more").hidden = dupShown >= page.total;
  say($("dup-message"), page.total ? "" : "No duplicates found.", false);
}

function groupView(group) {
  const box = document.createElement("fieldset");
  box.className = "group " + group.kind;
  const legend = document.createElement("legend");
  legend.textContent = `${group.kind === "exact" ? "Exact duplicates" : "Near duplicates"} · ${group.members.length} images · choose the one to keep`;
  box.append(legend);
  const name = "keep-" + (groupNumber += 1);
  const members = document.createElement("div");
  members.className = "members";
  group.members.forEach((member, index) => {
    const item = document.createElement("label");
    item.className = "member";
    item.dataset.id = member.id;
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = name;
    radio.value = member.id;
    radio.checked = index === 0;
    const img = document.createElement("img");
    img.alt = "image " + member.id.slice(0, 8);
    showImage(img, `/api/images/${member.id}/thumbnail`);
    img.loading = "lazy";
    const facts = document.createElement("span");
    facts.className = "facts";
    facts.textContent = `score ${member.score.toFixed(3)}`;
    item.append(radio, img, facts);
    members.append(item);
    api(`/api/images/${member.id}/metadata`).then((meta) => {
      facts.textContent = `${meta.label || "(no label)"} · ${meta.width}×${meta.height} · ${formatBytes(meta.size_bytes)} · score ${member.score.toFixed(3)}`;
    }).catch((e) => {
      facts.textContent = e.status === 404 ? "deleted since the scan" : e.message;
      if (e.status === 404) { item.classList.add("deleted"); radio.disabled = true; }
    });
  });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "danger";
  remove.textContent = `Keep the chosen one, delete the other ${group.members.length - 1}`;
  const outcome = document.createElement("div");
  outcome.setAttribute("role", "status");
  remove.addEventListener("click", async () => {
    const chosen = box.querySelector("input:checked");
    if (!chosen) { say(outcome, "Choose the image to keep first.", true); return; }
    const keep = chosen.value;
    const doomed = group.members.map((m) => m.id).filter((id) => id !== keep);
    if (!window.confirm(`Delete ${doomed.length} image(s) and keep ${keep.slice(0, 12)}…? This cannot be undone.`)) return;
    remove.disabled = true;
    let deleted = 0;
    for (const id of doomed) {
      try {
        await api(`/api/images/${id}`, { method: "DELETE" });
        box.querySelector(`.member[data-id="${id}"]`).classList.add("deleted");
        deleted += 1;
      } catch (e) {
        say(outcome, `Deleted ${deleted} of ${doomed.length}; then: ${e.message}`, true);
        remove.disabled = false;
        return;
      }
    }
    say(outcome, `Kept ${keep.slice(0, 12)}…, deleted ${deleted}.`, false);
    box.classList.add("resolved");
    refreshStatus();
    refreshLabels();
  });
  box.append(members, remove, outcome);
  return box;
}

// --- views, input and start-up -----------------------------------------------------------------------
const VIEWS = ["search", "collection", "duplicates"];
const loaded = new Set();

function currentView() {
  const name = location.hash.slice(1);
  return VIEWS.includes(name) ? name : "search";
}

function currentMessage() {
  return { search: $("message"), collection: $("gallery-message"), duplicates: $("dup-message") }[currentView()];
}

function showView() {
  const name = currentView();
  for (const view of VIEWS) {
    $("view-" + view).hidden = view !== name;
    const tab = $("tab-" + view);
    if (view === name) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
  }
  if (!loaded.has(name)) {
    loaded.add(name);
    if (name === "collection") loadGallery(false);
    if (name === "duplicates") loadDuplicates(false, false);
  }
}

function imageFiles(list) {
  return [...(list || [])].filter((f) => f.type.startsWith("image/") || f.type === "");
}

function dropTarget(element, onFiles) {
  ["dragenter", "dragover"].forEach((t) => element.addEventListener(t, (e) => { e.preventDefault(); element.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => element.addEventListener(t, (e) => { e.preventDefault(); element.classList.remove("over"); }));
  element.addEventListener("drop", (e) => onFiles([...e.dataTransfer.files]));
  // The drop zones are labels of hidden file inputs: Enter or Space opens the file chooser.
  element.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $(element.getAttribute("for")).click(); }
  });
}

dropTarget($("drop"), (files) => { if (files[0]) searchFile(files[0]); });
dropTarget($("upload-drop"), (files) => uploadFiles(files));
$("file").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) searchFile(f); e.target.value = ""; });
$("upload-files").addEventListener("change", (e) => { uploadFiles([...e.target.files]); e.target.value = ""; });
$("url-go").addEventListener("click", searchUrl);
$("url").addEventListener("keydown", (e) => { if (e.key === "Enter") searchUrl(); });
$("add").addEventListener("click", addImage);
$("more").addEventListener("click", loadMore);
$("gallery-more").addEventListener("click", () => loadGallery(true));
$("gallery-label").addEventListener("change", () => loadGallery(false));
$("dup-more").addEventListener("click", () => loadDuplicates(true, false));
$("dup-scan").addEventListener("click", () => loadDuplicates(false, true));

// Paste: an image (a screenshot, a copied picture) searches, or is added when the collection is shown;
// a pasted URL outside a text field searches by URL.
document.addEventListener("paste", (e) => {
  const files = imageFiles(e.clipboardData && e.clipboardData.files);
  if (files.length) {
    e.preventDefault();
    if (currentView() === "collection") uploadFiles(files);
    else { location.hash = "#search"; searchFile(files[0]); }
    return;
  }
  const text = (e.clipboardData && e.clipboardData.getData("text") || "").trim();
  const inField = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement;
  if (!inField && /^https?:\/\/\S+$/.test(text)) {
    e.preventDefault();
    location.hash = "#search";
    $("url").value = text;
    searchUrl();
  }
});

window.addEventListener("hashchange", showView);
showView();
refreshStatus();
refreshLabels();
