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
  $("#indice-info").textContent = i ? `${i.count.toLocaleString()} items · coarse ${i.roles.coarse}` : "";
  const mods = i ? i.modalities : ["image", "text"];
  for (const opt of $("#browse-modality").options) opt.disabled = !mods.includes(opt.value);
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
    $("#classify-error").textContent = e.message;
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

// --- memory browser -------------------------------------------------------------------------
async function browse(ev, imageFile) {
  if (ev) ev.preventDefault();
  $("#browse-error").textContent = "";
  const indice = $("#indice").value;
  const k = Math.max(1, Math.min(500, Number($("#browse-k").value) || 40));
  const body = { indice_name: indice, modality: $("#browse-modality").value, num_images: k, num_result_ids: k,
                 deduplicate: false, use_safety_model: false, use_violence_detector: false, use_mclip: false };
  try {
    if (imageFile) body.image = (await readAsDataURL(imageFile)).split(",")[1];
    else if ($("#browse-text").value.trim()) body.text = $("#browse-text").value.trim();
    else throw new Error("type a text or choose an image");
    const { body: rows } = await api("/knn-service", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    releaseThumbnails();
    $("#browse-header").textContent = `${rows.length} nearest in ${indice} (${body.modality} index)` +
      (imageFile ? ` to ${imageFile.name}` : ` to “${body.text}”`);
    $("#grid").replaceChildren(...rows.map((row) => el("figure", { class: "card" },
      thumbnail(indice, row), el("figcaption", {}, el("span", { text: row.caption || "" }),
        el("span", { class: "muted small", text: `#${row.id} · ${fmt(row.similarity)}` })))));
  } catch (e) {
    $("#browse-error").textContent = e.message;
  }
}

// --- wiring -----------------------------------------------------------------------------------
function wire() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
      for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== tab.dataset.tab;
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
  $("#classify-form").addEventListener("submit", classify);
  $("#browse-form").addEventListener("submit", (e) => browse(e, null));
  $("#browse-image").addEventListener("change", (e) => browse(null, e.target.files[0]));
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
    document.body.dataset.ready = "1";
  } catch (e) {
    $("#classify-error").textContent = e.message;
  }
}

wire();
start();
