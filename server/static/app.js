// xm serve's page: classify an image with any method, browse the memory.
// Every value from the server is shown with textContent (never parsed as HTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { indices: {}, methods: [], image: null, streamId: null, objectUrls: [] };

function token() { return sessionStorage.getItem("xm-token") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) { $("#auth").hidden = false; }
  const type = resp.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) throw new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
  return { body, headers: resp.headers };
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fmt(x, digits = 3) { return typeof x === "number" ? x.toFixed(digits) : "–"; }

function bar(value) {
  const wrap = el("span", { class: "bar" });
  const fill = el("span", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(1, value || 0)) * 100}%`;
  wrap.append(fill, el("span", { class: "num", text: fmt(value) }));
  return wrap;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error(`could not read ${file.name}`));
    r.readAsDataURL(file);
  });
}

// A memory item's picture: its URL when it is a web address, else its local source file.
function thumbnail(indice, row) {
  const img = el("img", { alt: row.caption || "", loading: "lazy" });
  const url = row.url || "";
  if (/^https?:\/\//i.test(url)) { img.src = url; return img; }
  if (!row.image_path && row.id === undefined) return img;
  fetch(`/xm/image/${encodeURIComponent(indice)}/${row.id}`, { headers: token() ? { Authorization: "Bearer " + token() } : {} })
    .then((r) => (r.ok ? r.blob() : null))
    .then((blob) => {
      if (!blob) { img.classList.add("missing"); return; }
      const u = URL.createObjectURL(blob);
      state.objectUrls.push(u);
      img.src = u;
    })
    .catch(() => img.classList.add("missing"));
  return img;
}

function releaseThumbnails() {
  for (const u of state.objectUrls) URL.revokeObjectURL(u);
  state.objectUrls = [];
}

// --- setup -------------------------------------------------------------------------------
async function loadIndices() {
  const { body: names } = await api("/indices-list");
  let info = {};
  try { info = (await api("/xm/indices")).body; } catch (e) { /* a plain clip back */ }
  state.indices = info;
  const select = $("#indice");
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  showIndiceInfo();
}

function showIndiceInfo() {
  const i = state.indices[$("#indice").value];
  $("#indice-info").textContent = i ? `${i.count.toLocaleString()} items · coarse ${clean(i.roles.coarse)}` : "";
  const mods = i ? i.modalities : ["image", "text"];
  for (const opt of $("#browse-modality").options) opt.disabled = !mods.includes(opt.value);
  if (!mods.includes($("#browse-modality").value)) $("#browse-modality").value = mods[0];
  showBrowseOptions();
}

async function loadMethods() {
  const { body } = await api("/xm/methods");
  state.methods = body;
  const select = $("#method");
  select.replaceChildren(...body.map((m) => el("option", { value: m.name, text: m.name })));
  select.value = body.some((m) => m.name === "xmore") ? "xmore" : body[0].name;
  showMethod();
}

function showMethod() {
  const m = state.methods.find((x) => x.name === $("#method").value);
  $("#method-summary").textContent = m ? m.summary : "";
}

// --- classify ------------------------------------------------------------------------------
async function setImage(file) {
  if (!file) return;
  state.image = file;
  const url = await readAsDataURL(file);
  const preview = $("#preview");
  preview.src = url;
  preview.hidden = false;
  $("#drop-hint").classList.add("small");
}

function parseOptions(text) {
  const out = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`option ${line}: expected NAME=VALUE`);
    const name = line.slice(0, at).trim().replace(/-/g, "_");
    const raw = line.slice(at + 1).trim();
    out[name] = raw === "true" ? true : raw === "false" ? false : raw !== "" && !isNaN(Number(raw)) ? Number(raw) : raw;
  }
  return out;
}

async function classify(ev) {
  ev.preventDefault();
  $("#classify-error").textContent = "";
  const file = state.image || $("#image-input").files[0];
  try {
    if (!file) throw new Error("choose or drop an image first");
    const labels = $("#labels").value.split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
    const body = Object.assign(parseOptions($("#options").value), {
      image: await readAsDataURL(file), labels, method: $("#method").value, indice_name: $("#indice").value, explain: true,
    });
    if ($("#use-stream").checked) body.stream = state.streamId || true;
    $("#classify-button").disabled = true;
    $("#classify-button").textContent = "Classifying…";
    const { body: result, headers } = await api("/classify", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if ($("#use-stream").checked) state.streamId = headers.get("X-XM-Stream") || state.streamId;
    showResult(result);
  } catch (e) {
    $("#classify-error").textContent = clean(e.message);
  } finally {
    $("#classify-button").disabled = false;
    $("#classify-button").textContent = "Classify";
  }
}

function showResult(r) {
  releaseThumbnails();
  $("#result").hidden = false;
  $("#prediction").textContent = r.prediction === null ? "(not scored)" : r.prediction;
  $("#stream-pos").textContent = r.stream_position ? `· ${r.method} · stream #${r.stream_position}` : `· ${r.method}`;
  $("#skipped").textContent = r.skipped ? `skipped: ${r.skipped}` : "";
  $("#top5 tbody").replaceChildren(...r.top5.map((t) => el("tr", {},
    el("td", { text: t.class }), el("td", {}, bar(t.prob)), el("td", {}, bar(t.p_img)), el("td", {}, bar(t.p_txt)))));
  const dl = $("#weights");
  dl.replaceChildren();
  const add = (k, v) => dl.append(el("dt", { text: k }), el("dd", { text: v }));
  if (r.weights) add("weights img / txt", `${fmt(r.weights.img)} / ${fmt(r.weights.txt)}`);
  if (r.weights_normalised) add("normalised", `${fmt(r.weights_normalised.img, 2)} / ${fmt(r.weights_normalised.txt, 2)}`);
  if (r.confidence) add("confidence img / txt", `${fmt(r.confidence.img)} / ${fmt(r.confidence.txt)}`);
  if (r.captions_used !== undefined) add("captions used / pool", `${r.captions_used} / ${r.pool}`);
  const caps = r.captions || [];
  $("#captions-count").textContent = caps.length ? `(${caps.length}, fine re-ranked)` : "(this method retrieves none)";
  const indice = $("#indice").value;
  $("#captions").replaceChildren(...caps.map((c) => el("li", { class: "caption" },
    thumbnail(indice, c),
    el("div", {}, el("p", { text: c.caption || "" }),
      el("p", { class: "muted small", text: `#${c.id} · fine sim ${fmt(c.fine_similarity)} · votes ${c.vote} (${fmt(c.vote_prob, 2)})` })))));
  document.body.dataset.result = "shown";
}

// --- memory browser: the query lives in the URL (shareable; back and forward re-run it) ------------
const PAGE = 40;        // results added per scroll
const MAX_RESULTS = 1000;
const browser = { query: null, rows: [], k: PAGE, busy: false, upload: null, runs: 0 };

// An error as the page shows it: never a server path (a message naming a file shows its name only).
function clean(message) {
  return String(message || "error").replace(/(?:[A-Za-z]:)?(?:[\/\\][^\s\/\\'"`:,;()]+){2,}/g, (p) => "…" + p.split(/[\/\\]/).pop());
}

function queryFromForm() {
  const q = { tab: "browse", indice: $("#indice").value, modality: $("#browse-modality").value,
              dedup: $("#browse-dedup").checked ? "1" : "0" };
  if (!$("#safe-box").hidden) q.safe = $("#browse-safe").checked ? "1" : "0";
  if (!$("#violence-box").hidden) q.violence = $("#browse-violence").checked ? "1" : "0";
  const text = $("#browse-text").value.trim();
  const url = $("#browse-url").value.trim();
  if (text) q.text = text; else if (url && !$("#browse-url-box").hidden) q.image_url = url;
  return q;
}

function queryToUrl(q) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) if (v !== undefined && v !== null && v !== "") params.set(k, v);
  return "?" + params.toString();
}

function queryFromUrl() {
  const p = new URLSearchParams(location.search);
  const q = {};
  for (const [k, v] of p.entries()) q[k] = v;
  return q;
}

function fillForm(q) {
  if (q.indice && state.indices[q.indice] !== undefined) { $("#indice").value = q.indice; showIndiceInfo(); }
  if (q.modality) $("#browse-modality").value = q.modality;
  $("#browse-text").value = q.text || "";
  $("#browse-url").value = q.image_url || "";
  $("#browse-dedup").checked = q.dedup !== "0";
  if (q.safe !== undefined) $("#browse-safe").checked = q.safe !== "0";
  if (q.violence !== undefined) $("#browse-violence").checked = q.violence === "1";
}

function showTab(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== name;
}

// A new search: into the browser's history, then run.
function search(q, upload = null) {
  browser.upload = upload;
  const url = queryToUrl(q);
  history.pushState({ q, upload }, "", url);
  return run(q, true);
}

async function knnBody(q) {
  const indice = q.indice || $("#indice").value;
  const body = { indice_name: indice, modality: q.modality || "image", num_images: browser.k, num_result_ids: browser.k,
                 deduplicate: q.dedup !== "0", use_safety_model: q.safe === "1", use_violence_detector: q.violence === "1",
                 use_mclip: false, aesthetic_score: "", aesthetic_weight: "" };
  if (q.text) body.text = q.text;
  else if (q.image_url) body.image_url = q.image_url;
  else if (q.similar !== undefined) {
    const of = q.of || "image";
    const { body: emb } = await api(`/xm/embedding/${encodeURIComponent(indice)}/${encodeURIComponent(q.similar)}?modality=${of}`);
    body.embedding_input = emb.embedding;
  } else if (q.upload && browser.upload) body.image = browser.upload.split(",")[1];
  else if (q.upload) throw new Error("an uploaded image is not kept in the URL: choose it again");
  else throw new Error("type a text, choose an image" + ($("#browse-url-box").hidden ? "" : " or give an image URL"));
  return body;
}

function describe(q) {
  if (q.text) return `“${q.text}”`;
  if (q.image_url) return `the image at ${q.image_url}`;
  if (q.similar !== undefined) return `item #${q.similar} (its ${q.of || "image"} embedding)`;
  if (q.upload) return `the uploaded ${q.upload}`;
  return "";
}

async function run(q, fresh) {
  if (browser.busy) return;
  browser.busy = true;
  $("#browse-error").textContent = "";
  if (fresh) { browser.k = PAGE; browser.rows = []; browser.query = q; }
  try {
    const { body: rows, headers } = await api("/knn-service", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(await knnBody(q)),
    });
    const indice = q.indice || $("#indice").value;
    if (fresh) { releaseThumbnails(); $("#grid").replaceChildren(); }
    const shown = browser.rows.length;
    browser.rows = rows;
    const unhonoured = headers.get("X-XM-Unhonoured-Options");
    $("#browse-header").textContent = `${rows.length} nearest in ${indice} (${q.modality || "image"} index) to ${describe(q)}` +
      (unhonoured && unhonoured !== "none" ? ` · not applied: ${unhonoured}` : "");
    $("#grid").append(...rows.slice(shown).map((row) => card(indice, q, row)));
    const more = rows.length >= browser.k && browser.k < MAX_RESULTS;
    $("#grid-end").textContent = more ? "scroll for more" : rows.length ? "end of results" : "no results";
    $("#grid-end").dataset.more = more ? "1" : "0";
    $("#browse-download").disabled = rows.length === 0;
    browser.runs += 1;
    document.body.dataset.browse = String(browser.runs);
  } catch (e) {
    $("#browse-error").textContent = clean(e.message);
  } finally {
    browser.busy = false;
  }
}

function card(indice, q, row) {
  const similar = el("button", { type: "button", class: "similar", text: "similar" });
  const of = (state.indices[indice] || {}).modalities || ["image"];
  similar.addEventListener("click", () => {
    // the item's own stored embedding, searched in the index of the same modality (itself comes first)
    const mod = of.includes("image") ? "image" : "text";
    const next = { tab: "browse", indice, modality: mod, dedup: q.dedup, safe: q.safe, violence: q.violence,
                   similar: String(row.id), of: mod };
    fillForm(next);
    search(next);
    window.scrollTo(0, 0);
  });
  const fig = el("figure", { class: "card", "data-id": String(row.id) },
    thumbnail(indice, row),
    el("figcaption", {}, el("span", { text: row.caption || "" }),
      el("span", { class: "muted small", text: `#${row.id} · ${fmt(row.similarity)}` })),
    el("div", { class: "actions" }, similar));
  return fig;
}

function more() {
  if (!browser.query || browser.busy || $("#grid-end").dataset.more !== "1") return;
  browser.k = Math.min(MAX_RESULTS, browser.k + PAGE);
  run(browser.query, false);
}

function download() {
  const data = JSON.stringify({ query: browser.query, results: browser.rows }, null, 2);
  const a = el("a", { href: URL.createObjectURL(new Blob([data], { type: "application/json" })), download: "xm-results.json" });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// Offer only what the served index can do: its indexes, its filters, URL fetching when the server allows it.
function showBrowseOptions() {
  const i = state.indices[$("#indice").value] || {};
  const filters = i.filters || ["deduplicate"];
  $("#safe-box").hidden = !filters.includes("use_safety_model");
  $("#violence-box").hidden = !filters.includes("use_violence_detector");
  $("#browse-url-box").hidden = !i.image_url;
}

function onPopState() {
  const q = (history.state && history.state.q) || queryFromUrl();
  browser.upload = (history.state && history.state.upload) || null;
  showTab(q.tab === "browse" ? "browse" : "classify");
  fillForm(q);
  if (q.tab === "browse" && (q.text || q.image_url || q.similar !== undefined || q.upload)) run(q, true);
  else { $("#grid").replaceChildren(); $("#browse-header").textContent = ""; $("#grid-end").textContent = ""; }
}

// --- wiring -----------------------------------------------------------------------------------
function wire() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      showTab(tab.dataset.tab);
      const q = tab.dataset.tab === "browse" ? (browser.query || { tab: "browse", indice: $("#indice").value }) : { tab: "classify" };
      history.pushState({ q, upload: browser.upload }, "", queryToUrl(q));
    });
  }
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setImage(e.dataTransfer.files[0]); });
  drop.addEventListener("click", (e) => { if (e.target === drop) $("#image-input").click(); });
  $("#image-input").addEventListener("change", (e) => setImage(e.target.files[0]));
  $("#labels-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (f) $("#labels").value = await f.text();
  });
  $("#method").addEventListener("change", () => { showMethod(); state.streamId = null; });
  $("#indice").addEventListener("change", () => { showIndiceInfo(); state.streamId = null; });
  window.addEventListener("popstate", onPopState);
  new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) more(); }).observe($("#grid-end"));
  $("#browse-download").addEventListener("click", download);
  $("#classify-form").addEventListener("submit", classify);
  $("#browse-form").addEventListener("submit", (e) => { e.preventDefault(); search(queryFromForm()); });
  $("#browse-image").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (!f) return;
    const q = Object.assign(queryFromForm(), { upload: f.name });
    delete q.text; delete q.image_url;
    $("#browse-text").value = "";
    search(q, await readAsDataURL(f));
  });
  $("#token-save").addEventListener("click", () => {
    sessionStorage.setItem("xm-token", $("#token").value.trim());
    start();
  });
}

async function start() {
  try {
    await loadIndices();
    await loadMethods();
    $("#auth").hidden = !token() && $("#auth").hidden;
    const q = queryFromUrl();
    history.replaceState({ q, upload: null }, "", location.search || "?");
    onPopState();
    document.body.dataset.ready = "1";
  } catch (e) {
    $("#classify-error").textContent = clean(e.message);
  }
}

wire();
start();
