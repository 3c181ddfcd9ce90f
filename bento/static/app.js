"use strict";
"use strict";
const $ = (id) => document.getElementById(id);
let lastFile = null;

function show(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

// API keys: asked for only when an action needs one (the service answers 401 and names the scope),
// kept for this browser session only, and sent as X-API-Key.
const KEY_ITEM = "ris-api-key";

async function api(path, options, retried) {
  const opts = Object.assign({}, options || {});
  const key = sessionStorage.getItem(KEY_ITEM);
  opts.headers = Object.assign({}, opts.headers || {}, key ? { "X-API-Key": key } : {});
  const response = await fetch(path, opts);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = body.detail && typeof body.detail === "object" ? JSON.stringify(body.detail) : body.detail;
    const needsKey = response.status === 401 || (response.status === 403 && body.error === "forbidden" && key);
    if (needsKey && !retried) {
      const scope = (String(detail || "").match(/'(search|write|admin)'/) || [])[1] || "the right";
      const entered = window.prompt(`${detail || "This action needs an API key."}\nEnter an API key with ${scope} scope:`);
      if (entered) {
        sessionStorage.setItem(KEY_ITEM, entered.trim());
        return api(path, options, true);
      }
    }
    if (response.status === 401 && retried) sessionStorage.removeItem(KEY_ITEM);
    throw new Error(detail || body.error || ("HTTP " + response.status));
  }
  return body;
}

function options() {
  const topK = parseInt($("top-k").value, 10) || 12;
  const label = $("label").value.trim();
  return { top_k: topK, label: label || null };
}

function render(result) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of result.hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.dataset.testid = "hit";
    card.title = "Search with this image";
    const img = document.createElement("img");
    img.src = hit.thumbnail_url;
    img.alt = hit.label || hit.id;
    img.loading = "lazy";
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label || "(no label)";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(label, score);
    const link = document.createElement("a");
    link.href = hit.image_url;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = "original";
    link.addEventListener("click", (e) => e.stopPropagation());
    card.append(img, meta, link);
    card.addEventListener("click", () => searchById(hit.id, hit.thumbnail_url));
    grid.append(card);
  }
  const t = result.timings;
  $("timings").textContent =
    `${result.hits.length} results · decode ${t.decode_ms} ms · embed ${t.embed_ms} ms · search ${t.search_ms} ms · total ${t.total_ms} ms`;
  show(result.hits.length ? "" : "No matches.", false);
}

function preview(src) {
  const drop = $("drop");
  drop.replaceChildren();
  const img = document.createElement("img");
  img.src = src;
  img.alt = "query image";
  drop.append(img);
}

async function searchFile(file) {
  lastFile = file;
  $("add").disabled = false;
  preview(URL.createObjectURL(file));
  show("Searching…", false);
  const form = new FormData();
  form.append("file", file);
  const o = options();
  form.append("top_k", o.top_k);
  if (o.label) form.append("label", o.label);
  try { render(await api("/api/search", { method: "POST", body: form })); }
  catch (e) { show(e.message, true); $("results").replaceChildren(); }
}

async function searchById(id, thumbnailUrl) {
  preview(thumbnailUrl);
  lastFile = null;
  $("add").disabled = true;
  show("Searching…", false);
  try {
    render(await api("/api/search/id", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id, ...options() }),
    }));
    window.scrollTo({ top: 0, behavior: "smooth" });
  } catch (e) { show(e.message, true); }
}

async function searchUrl() {
  const url = $("url").value.trim();
  if (!url) return;
  preview(url);
  lastFile = null;
  $("add").disabled = true;
  show("Fetching and searching…", false);
  try {
    render(await api("/api/search/url", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ url, ...options() }),
    }));
  } catch (e) { show(e.message, true); }
}

async function addImage() {
  if (!lastFile) return;
  const form = new FormData();
  form.append("file", lastFile);
  const label = $("add-label").value.trim();
  if (label) form.append("label", label);
  try {
    const r = await api("/api/images", { method: "POST", body: form });
    show(r.created ? `Added as ${r.id.slice(0, 12)}…` : "Already in the collection; nothing changed.", false);
    refreshStatus();
  } catch (e) { show(e.message, true); }
}

async function refreshStatus() {
  try {
    const s = await api("/api/status");
    const m = s.model;
    $("status").textContent = `${s.count} images · model ${m.backbone} (${m.pretrained ? m.weights : "random weights"}) · ${s.index.index_type} · ${s.milvus_backend}`
      + (s.ready ? "" : " · NOT READY: " + s.error);
  } catch (e) { $("status").textContent = "status unavailable: " + e.message; }
}

const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) searchFile(f); });
$("file").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) searchFile(f); e.target.value = ""; });
$("url-go").addEventListener("click", searchUrl);
$("url").addEventListener("keydown", (e) => { if (e.key === "Enter") searchUrl(); });
$("add").addEventListener("click", addImage);
refreshStatus();
