// msk cluster review: one cluster at a time, every decision saved by the server at once.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { run: null, cluster: null, data: null, merging: false, completions: [], active: -1 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {  // the server is gone: every decision so far is on disk
    $("offline").hidden = false;
    return { ok: false, status: 0, data: { error: "the review server does not answer" } };
  }
  $("offline").hidden = true;
  let data = {};
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  return { ok: response.ok, status: response.status, data };
}

function showProgress(p) {
  if (!p) return;
  const share = (a, b) => (b ? (100 * a / b) : 0);
  $("progress-clusters").style.width = share(p.decided, p.clusters) + "%";
  $("progress-images").style.width = share(p.images_covered, p.images) + "%";
  $("progress-text").textContent = `${p.decided} / ${p.clusters} clusters decided (${p.named} named, ` +
    `${p.discarded} discarded, ${p.merged} merged)`;
  $("progress-images-text").textContent = `${p.images_covered} / ${p.images} images covered ` +
    `(${share(p.images_covered, p.images).toFixed(0)} %)`;
  $("progress-text").dataset.decided = p.decided;
  $("done").hidden = !(p.clusters && p.decided === p.clusters);
}

function showError(message, suggestions = []) {
  const box = $("error");
  box.replaceChildren(document.createTextNode(message));
  if (suggestions.length) {
    box.append(el("br"), document.createTextNode("did you mean: "));
    suggestions.forEach((name) => {
      const b = el("button", { type: "button", class: "suggestion", text: name });
      b.addEventListener("click", () => { $("name").value = name; saveName(); });
      box.append(b);
    });
  }
  box.hidden = false;
}

function clearError() { $("error").hidden = true; $("error").replaceChildren(); }

function showConflict(on) {
  const dialog = $("conflict");
  if (on && !dialog.open) { $("conflict-file").textContent = state.run.labels_file; dialog.showModal(); }
  if (!on && dialog.open) dialog.close();
}

function render(d) {
  state.data = d;
  $("title").textContent = `cluster ${d.cluster}`;
  $("size").textContent = `${d.size} image${d.size === 1 ? "" : "s"}` +
    (d.rank ? ` · ${d.rank} of ${state.run.order.length} by size` : " · empty");
  const current = $("current");
  current.replaceChildren();
  if (d.merged_into !== null && d.merged_into !== undefined) {
    current.append(el("span", { class: "badge", text: `merged into ${d.merged_into}` }),
      document.createTextNode(d.effective ? ` → ${d.effective}` : " (not named yet)"));
  } else if (d.effective) {
    current.append(el("span", { class: "badge" + (d.effective === state.run.discard ? " discard" : ""), text: d.effective }));
  } else {
    current.append(el("span", { class: "badge open", text: "no decision yet" }));
  }
  if (d.named_by) current.append(document.createTextNode(` by ${d.named_by}`));
  if (d.merged_here.length) current.append(document.createTextNode(` · clusters ${d.merged_here.join(", ")} merged here`));
  current.dataset.label = d.effective;
  $("name").value = d.label && !d.merged_into ? d.label : "";
  clearError();
  hideCompletions();
  setMerging(false);

  const hints = $("hint-list");
  hints.replaceChildren(...d.hints.map((h) => el("li", { text: h })));
  $("hints").hidden = !d.hints.length;

  $("neighbours-from").textContent = d.neighbours_from ? `(by ${d.neighbours_from})` : "";
  $("neighbours").replaceChildren(...d.neighbours.map((n, i) => {
    const li = el("li", { "data-cluster": n.cluster },
      el("kbd", { class: "key", text: String(i + 1) }),
      ...n.thumbs.map((r) => el("img", { src: `/thumb/${r}.png`, alt: "", loading: "lazy" })),
      el("span", { class: "info", text: `cluster ${n.cluster} · ${n.size} img · sim ${n.similarity.toFixed(2)}` +
        (n.label ? ` · ${n.label}` : "") }));
    li.addEventListener("click", () => (state.merging ? merge(n.cluster) : go(n.cluster)));
    return li;
  }));

  $("grid").replaceChildren();
  addImages(d.rows);
  $("more").hidden = !d.more;
  $("more").textContent = "";
  $("more").append(`more images (${d.more} left) `, el("kbd", { text: "+" }));
  showProgress(d.progress);
  $("undo").disabled = !d.can_undo;
  showConflict(d.conflict);
}

function addImages(rows) {
  const grid = $("grid");
  rows.forEach((r) => grid.append(el("img", { src: `/thumb/${r}.png`, alt: `image row ${r}`, loading: "lazy" })));
  grid.dataset.count = grid.children.length;
}

async function go(cluster, push = true) {
  const { ok, status, data } = await api(`/api/clusters/${cluster}`);
  if (!ok) { if (status === 404) window.location.href = `/cluster/${cluster}`; return; }
  state.cluster = cluster;
  if (push) history.pushState({ cluster }, "", `/cluster/${cluster}`);
  document.title = `msk · cluster ${cluster}`;
  render(data);
  document.body.dataset.ready = String(cluster);
}

async function after(result) {
  if (!result.ok) {
    if (result.data.conflict) { showConflict(true); }
    showError(result.data.error || `error ${result.status}`, result.data.suggestions || []);
    return false;
  }
  showProgress(result.data.progress);
  const next = result.data.next;
  await go(next === null || next === undefined ? state.cluster : next);
  return true;
}

async function saveName(text) {
  const name = (text === undefined ? $("name").value : text).trim();
  if (!name) { showError(`type a name of ${state.run.region_set}, or ${state.run.discard}`); return; }
  hideCompletions();
  if (await after(await api(`/api/clusters/${state.cluster}`, { action: "name", name }))) $("name").blur();
}

async function discard() { await after(await api(`/api/clusters/${state.cluster}`, { action: "discard" })); }
async function skip() { await after(await api(`/api/clusters/${state.cluster}`, { action: "skip" })); }
async function merge(into) {
  setMerging(false);
  await after(await api(`/api/clusters/${state.cluster}`, { action: "merge", into }));
}
async function undo() {
  const { ok, data } = await api("/api/undo", {});
  if (!ok) { if (data.conflict) showConflict(true); showError(data.error || "cannot undo"); return; }
  showProgress(data.progress);
  if (data.cluster === null) { showError("nothing to undo"); return; }
  await go(data.cluster);
}
function previous() {
  const order = state.run.order, i = order.indexOf(state.cluster);
  if (order.length) go(order[(i - 1 + order.length) % order.length]);
}
async function more() {
  const d = state.data;
  const offset = Number($("grid").dataset.count || 0);
  const { ok, data } = await api(`/api/clusters/${d.cluster}?offset=${offset}`);
  if (!ok) return;
  addImages(data.rows);
  $("more").hidden = !data.more;
  $("more").textContent = "";
  $("more").append(`more images (${data.more} left) `, el("kbd", { text: "+" }));
}

function setMerging(on) {
  state.merging = on && state.data && state.data.neighbours.length > 0;
  $("merge-prompt").hidden = !state.merging;
  document.body.classList.toggle("merging", state.merging);
  if (on && !state.merging) showError("no nearest cluster to merge with");
}

// -- completions -----------------------------------------------------------------------------

function completionsFor(text) {
  const t = text.trim().toLowerCase();
  if (!t) return [];
  const starts = [], contains = [];
  const all = [...state.run.spellings, { spelling: state.run.discard, name: state.run.discard }];
  for (const s of all) {
    const low = s.spelling.toLowerCase();
    if (low.startsWith(t)) starts.push(s); else if (low.includes(t)) contains.push(s);
  }
  const seen = new Set(), out = [];
  for (const s of [...starts, ...contains]) {
    const spelling = s.spelling.toLowerCase() === s.name.toLowerCase() ? s.name : s.spelling;
    const key = spelling.toLowerCase() + "|" + s.name;
    if (!seen.has(key)) { seen.add(key); out.push({ spelling, name: s.name }); }
  }
  return out.slice(0, 8);
}

function showCompletions() {
  const list = $("completions");
  state.completions = completionsFor($("name").value);
  state.active = -1;
  list.replaceChildren(...state.completions.map((s, i) => {
    const li = el("li", { role: "option", "data-name": s.name },
      document.createTextNode(s.spelling));
    if (s.spelling !== s.name) li.append(el("small", { text: ` → ${s.name}` }));
    li.addEventListener("mousedown", (e) => { e.preventDefault(); saveName(s.name); });
    return li;
  }));
  list.hidden = !state.completions.length;
}

function hideCompletions() { $("completions").hidden = true; state.completions = []; state.active = -1; }

function moveActive(step) {
  if (!state.completions.length) return;
  state.active = (state.active + step + state.completions.length) % state.completions.length;
  [...$("completions").children].forEach((li, i) => li.classList.toggle("active", i === state.active));
}

// -- keys ------------------------------------------------------------------------------------

function onNameKey(e) {
  if (e.key === "ArrowDown") { moveActive(1); e.preventDefault(); }
  else if (e.key === "ArrowUp") { moveActive(-1); e.preventDefault(); }
  else if (e.key === "Tab" && state.completions.length) {
    const pick = state.completions[Math.max(state.active, 0)];
    $("name").value = pick.name; hideCompletions(); e.preventDefault();
  } else if (e.key === "Enter") {
    e.preventDefault();
    const pick = state.active >= 0 ? state.completions[state.active].name : undefined;
    saveName(pick);
  } else if (e.key === "Escape") { hideCompletions(); $("name").blur(); e.preventDefault(); }
}

function onKey(e) {
  if (e.target === $("name") || e.ctrlKey || e.metaKey || e.altKey) return;
  if ($("conflict").open) {
    if (e.key === "f") resolve("file"); else if (e.key === "o") resolve("app");
    e.preventDefault(); return;
  }
  if ($("help").open) return;
  if (state.merging) {
    if (/^[1-9]$/.test(e.key)) {
      const n = state.data.neighbours[Number(e.key) - 1];
      if (n) merge(n.cluster);
    } else if (e.key === "Escape") setMerging(false);
    e.preventDefault(); return;
  }
  const actions = {
    n: () => $("name").focus(), Enter: () => $("name").focus(), d: discard, m: () => setMerging(true),
    s: skip, ArrowRight: skip, p: previous, ArrowLeft: previous, u: undo, "+": more,
    "?": () => $("help").showModal(),
  };
  if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
}

async function resolve(keep) {
  const { ok, data } = await api("/api/conflict", { keep });
  if (!ok) {
    const box = $("conflict-error"); box.textContent = data.error || "cannot load the file"; box.hidden = false; return;
  }
  $("conflict-error").hidden = true;
  showConflict(false);
  await go(state.cluster, false);
}

async function poll() {
  if (!state.run || state.run.empty) return;
  const { ok, data } = await api("/api/status");
  if (ok) { showConflict(data.conflict); showProgress(data.progress); $("undo").disabled = !data.can_undo; }
}

async function start() {
  const { data } = await api("/api/run");
  state.run = data;
  $("run").textContent = data.run;
  $("reviewer").textContent = data.reviewer ? `reviewer: ${data.reviewer}` : "";
  if (data.reports.length) {
    $("reports").replaceChildren(el("span", { class: "dim", text: "results: " }),
      ...data.reports.map((r) => el("a", { href: r.url, target: "_blank", text: r.name })));
  }
  if (data.empty) {
    $("empty").replaceChildren(el("h1", { text: "no clusters to review" }), el("p", { text: data.empty }));
    $("empty").hidden = false;
    document.querySelector(".progress").hidden = true;
    document.body.dataset.ready = "empty";
    return;
  }
  $("files").textContent = `labels: ${data.labels_file} · audit log: ${data.audit_file}`;
  $("main").hidden = false;
  $("name").addEventListener("input", showCompletions);
  $("name").addEventListener("keydown", onNameKey);
  $("name").addEventListener("blur", hideCompletions);
  $("name-form").addEventListener("submit", (e) => { e.preventDefault(); saveName(); });
  $("discard").addEventListener("click", discard);
  $("merge").addEventListener("click", () => setMerging(!state.merging));
  $("skip").addEventListener("click", skip);
  $("prev").addEventListener("click", previous);
  $("undo").addEventListener("click", undo);
  $("more").addEventListener("click", more);
  $("help-button").addEventListener("click", () => $("help").showModal());
  $("load-file").addEventListener("click", () => resolve("file"));
  $("keep-app").addEventListener("click", () => resolve("app"));
  $("conflict").addEventListener("cancel", (e) => e.preventDefault());
  document.addEventListener("keydown", onKey);
  window.addEventListener("popstate", (e) => { if (e.state) go(e.state.cluster, false); });
  await go(Number(document.body.dataset.cluster), false);
  history.replaceState({ cluster: state.cluster }, "", `/cluster/${state.cluster}`);
  setInterval(poll, 2000);
}

start();
