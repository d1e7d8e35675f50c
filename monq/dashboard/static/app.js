// monq dashboard: vanilla JS, no build step, no outside requests.
//
// Everything from the database (labels, errors, tracebacks, stdout) is
// untrusted text: it only ever reaches the page through textContent or an
// attribute set with setAttribute, never through innerHTML.
"use strict";

(function () {
  const FAILED = ["error", "timeout", "lost", "aborted"];
  const STATUSES = ["pending", "running", "ok", "error", "timeout", "aborted", "lost", "resubmitted"];
  const SVG = "http://www.w3.org/2000/svg";
  // characters of a msg_id shown (monq.records.SHORT_ID): ids begin with their time, so
  // the random characters after it are what tells tasks of the same moment apart
  const SHORT_ID = 20;
  const $ = (sel) => document.querySelector(sel);

  const state = {
    filters: {},          // the form's non-empty fields, as the API names them
    order: "-submitted",
    limit: 50,
    cursors: [null],      // cursor of each page seen so far; the last is the current page
    nextCursor: null,
    openTask: null,       // msg_id shown in the task view
    overview: null,
    live: false,
  };

  // -- helpers -------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "class") node.className = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const pad = (n, w = 2) => String(n).padStart(w, "0");

  function fmtTime(t, withMs) {
    if (t === null || t === undefined) return "–";
    const d = new Date(t * 1000);
    const now = new Date();
    let s = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    if (withMs) s += "." + pad(d.getMilliseconds(), 3);
    if (d.toDateString() !== now.toDateString()) {
      s = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${s}`;
    }
    return s;
  }

  const isoTime = (t) => (t === null || t === undefined ? "" : new Date(t * 1000).toISOString());

  function fmtDuration(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "–";
    if (s < 0) s = 0;
    if (s < 1) return `${(s * 1000).toFixed(1)} ms`;
    if (s < 120) return `${s.toFixed(2)} s`;
    if (s < 7200) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1024) return `${n} B`;
    if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / (1 << 20)).toFixed(1)} MiB`;
  }

  const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  // terminal colour codes in captured output are noise on a page
  const stripAnsi = (s) => (s || "").replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
  const badge = (text, cls) => el("span", { class: `badge ${cls || text}`, text });

  async function api(path, params) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    }
    const resp = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (resp.status === 401 || resp.status === 403) {
      showBanner("This page needs the dashboard's token: open the URL that `monq dashboard` printed.");
      throw new Error("unauthorized");
    }
    if (!resp.ok) {
      const err = new Error((body && body.error) || `HTTP ${resp.status}`);
      err.status = resp.status;
      throw err;
    }
    return body;
  }

  function showBanner(text) {
    const b = $("#banner");
    if (text) { b.textContent = text; b.hidden = false; } else { b.hidden = true; }
  }

  // -- the URL hash keeps filters, order and the open task (links can be shared) --

  function readHash() {
    const p = new URLSearchParams(window.location.hash.slice(1));
    const form = $("#filters");
    for (const input of form.elements) {
      if (input.name) input.value = p.get(input.name) || "";
    }
    state.order = p.get("order") || "-submitted";
    state.openTask = p.get("task") || null;
    state.filters = formFilters();
  }

  function writeHash() {
    const p = new URLSearchParams(state.filters);
    if (state.order !== "-submitted") p.set("order", state.order);
    if (state.openTask) p.set("task", state.openTask);
    const h = p.toString();
    const target = h ? `#${h}` : window.location.pathname + window.location.search;
    if ((h ? `#${h}` : "") !== window.location.hash) history.replaceState(null, "", target);
  }

  function formFilters() {
    const out = {};
    for (const input of $("#filters").elements) {
      if (input.name && input.value.trim() !== "") out[input.name] = input.value.trim();
    }
    return out;
  }

  // -- overview: mode, cards, engines --------------------------------------------

  async function loadOverview() {
    let ov;
    try {
      ov = await api("/api/overview");
    } catch (e) {
      if (e.message !== "unauthorized") setMode("unreachable", "dashboard server unreachable");
      return;
    }
    state.overview = ov;
    state.live = ov.live;
    $("#auto-toggle").hidden = ov.mode === "post-mortem";  // a finished history stays put
    if (ov.mode === "post-mortem") {
      setMode("post-mortem", "post-mortem");
    } else if (ov.live) {
      setMode("live", "live");
    } else {
      setMode("unreachable", "no cluster answering");
    }
    $("#where").textContent = ov.profile ? `profile ${ov.profile} · ${ov.db}` : ov.db;
    $("#where").title = ov.db;
    if (ov.mode !== "post-mortem" && !ov.live && ov.cluster_error) {
      showBanner(`The cluster is not answering (${ov.cluster_error}). Showing what the ` +
                 "database recorded; the page reconnects when the cluster is back.");
    } else if ($("#banner").textContent.startsWith("The cluster is not answering")) {
      showBanner(null);
    }
    renderCards(ov);
    renderEngines(ov);
    renderStatuses(ov);
    $("#updated").textContent = `updated ${fmtTime(ov.now)}`;
  }

  function setMode(mode, text) {
    const m = $("#mode");
    m.dataset.mode = mode;
    m.textContent = text;
  }

  function renderCards(ov) {
    const alive = ov.engines.filter((e) => e.status === "alive").length;
    $("#n-engines").textContent = ov.live ? fmtInt(alive) : fmtInt(ov.engines.length);
    $("#n-engines-sub").textContent = ov.live
      ? `alive · ${fmtInt(ov.engines.length)} ever registered`
      : "recorded in the database";
    $("#n-running").textContent = fmtInt(ov.queue.running);
    $("#n-running").nextElementSibling.textContent = ov.live ? "tasks on engines" : "recorded as running";
    $("#n-queue").textContent = fmtInt(ov.queue.unassigned + ov.queue.queued);
    $("#n-queue-sub").textContent = ov.queue.queued
      ? `${fmtInt(ov.queue.unassigned)} unassigned · ${fmtInt(ov.queue.queued)} queued on engines`
      : ov.live ? "waiting for an engine" : "recorded as pending";
    $("#n-ok").textContent = fmtInt(ov.counts.ok);
    const failed = FAILED.reduce((n, s) => n + (ov.counts[s] || 0), 0);
    $("#n-failed").textContent = fmtInt(failed);
    const parts = FAILED.filter((s) => ov.counts[s]).map((s) => `${fmtInt(ov.counts[s])} ${s}`);
    $("#n-failed-sub").textContent = parts.length ? parts.join(" · ") : "error, timeout, lost, aborted";
  }

  function renderEngines(ov) {
    const body = $("#engines tbody");
    const departed = ov.engines.filter((e) => e.status !== "alive").length;
    // a long-lived profile collects many departed engines: live, they hide unless asked for
    const toggle = $("#departed-toggle");
    toggle.hidden = !ov.live || departed === 0;
    $("#departed-text").textContent = `show ${departed} departed`;
    const shown = ov.live && !$("#departed").checked
      ? ov.engines.filter((e) => e.status === "alive") : ov.engines;
    const maxLoad = Math.max(1, ...shown.map((e) => e.running + e.queued));
    const rows = shown.map((e) => {
      const gone = e.status !== "alive";
      const load = el("div", { class: "load" });
      const bar = el("div", { class: "bar", title: `${e.running} running, ${e.queued} queued` });
      const r = el("div", { class: "r" });
      r.style.width = `${(100 * e.running) / maxLoad}%`;
      const q = el("div", { class: "q" });
      q.style.width = `${(100 * e.queued) / maxLoad}%`;
      bar.append(r, q);
      load.append(bar);
      const since = gone && e.unregistered ? e.unregistered : e.registered;
      const tr = el("tr", { class: gone ? "gone" : null, "data-engine": e.id,
                            title: `show engine ${e.id}'s tasks` },
        el("td", { class: "num", text: e.id }),
        el("td", { text: e.hostname || "–" }),
        el("td", { class: "num", text: e.pid || "–" }),
        el("td", {}, badge(e.state)),
        el("td", {}, load),
        el("td", { class: "num", text: fmtInt(e.running) }),
        el("td", { class: "num", text: fmtInt(e.queued) }),
        el("td", { class: "num", text: fmtInt(e.ok) }),
        el("td", { class: "num", text: fmtInt(e.failed) }),
        el("td", { title: isoTime(since), text: (gone ? "gone " : "") + fmtTime(since) }));
      tr.addEventListener("click", () => setFilter("engine", String(e.id)));
      return tr;
    });
    body.replaceChildren(...rows);
    $("#engines-empty").hidden = rows.length > 0;
    const alive = ov.engines.filter((e) => e.status === "alive").length;
    $("#engines-note").textContent = ov.live
      ? `${alive} alive, load = running + queued`
      : "as the database last recorded them";
  }

  function renderStatuses(ov) {
    const total = STATUSES.reduce((n, s) => n + (ov.counts[s] || 0), 0);
    const bar = $("#status-bar");
    bar.replaceChildren(...STATUSES.filter((s) => ov.counts[s]).map((s) => {
      const seg = el("div", { class: `st-${s}`, title: `${fmtInt(ov.counts[s])} ${s}` });
      seg.style.width = `${(100 * ov.counts[s]) / total}%`;
      return seg;
    }));
    $("#status-legend").replaceChildren(...STATUSES.filter((s) => ov.counts[s]).map((s) => {
      const b = el("button", { type: "button", title: `show the ${s} tasks` },
        el("span", { class: `dot st-${s}` }), s, el("b", { text: fmtInt(ov.counts[s]) }));
      b.addEventListener("click", () => setFilter("status", s));
      return b;
    }));
    if (!total) $("#status-legend").append(el("span", { text: "no tasks recorded yet" }));
  }

  // -- throughput chart -------------------------------------------------------------

  async function loadChart() {
    let data;
    try {
      data = await api("/api/throughput", { window: $("#window").value });
    } catch (e) {
      return;
    }
    renderChart(data);
  }

  // the top of the y axis: four gridlines, each a whole 1, 2 or 5 times a power of ten
  function niceMax(v) {
    const raw = Math.max(1, v / 4);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return 4 * m * p;
    return 40 * p;
  }

  function renderChart(data) {
    const box = $("#chart");
    const W = Math.max(300, box.clientWidth || 600);
    const H = Math.max(160, box.clientHeight || 220);
    const m = { l: 40, r: 10, t: 10, b: 24 };
    const pts = data.points;
    const total = pts.reduce((n, p) => n + p.ok + p.failed, 0);
    const peak = Math.max(0, ...pts.map((p) => p.ok + p.failed));
    const ymax = niceMax(peak);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
    const iw = W - m.l - m.r;
    const ih = H - m.t - m.b;
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4;
      const y = m.t + ih - (ih * i) / 4;
      root.append(svg("line", { class: "grid", x1: m.l, x2: W - m.r, y1: y, y2: y }));
      root.append(svg("text", { class: "axis", x: m.l - 6, y: y + 4, "text-anchor": "end" },
                      fmtInt(v)));
    }
    const bw = iw / Math.max(1, pts.length);
    const gap = bw > 4 ? 1 : 0;
    pts.forEach((p, i) => {
      const x = m.l + i * bw;
      const hOk = (ih * p.ok) / ymax;
      const hBad = (ih * p.failed) / ymax;
      const tip = `${fmtTime(p.t)}: ${p.ok} ok, ${p.failed} failed`;
      if (p.ok) {
        const r = svg("rect", { class: "ok", x: x + gap / 2, width: Math.max(1, bw - gap),
                                y: m.t + ih - hOk, height: hOk });
        r.append(svg("title", {}, tip));
        root.append(r);
      }
      if (p.failed) {
        const r = svg("rect", { class: "bad", x: x + gap / 2, width: Math.max(1, bw - gap),
                                y: m.t + ih - hOk - hBad, height: hBad });
        r.append(svg("title", {}, tip));
        root.append(r);
      }
    });
    const ticks = 5;
    for (let i = 0; i <= ticks; i++) {
      const idx = Math.min(pts.length - 1, Math.round(((pts.length - 1) * i) / ticks));
      if (idx < 0) break;
      const x = m.l + idx * bw + bw / 2;
      const anchor = i === 0 ? "start" : i === ticks ? "end" : "middle";
      root.append(svg("text", { class: "axis", x, y: H - 6, "text-anchor": anchor },
                      fmtTime(pts[idx].t).slice(-8, data.bucket < 60 ? 8 : 5)));
    }
    if (!total) {
      root.append(svg("text", { class: "none", x: m.l + iw / 2, y: m.t + ih / 2,
                                "text-anchor": "middle" }, "no task finished in this window"));
    }
    box.replaceChildren(root);
    const rate = total / data.window;
    const unit = data.bucket === 1 ? "per second" : `per ${fmtDuration(data.bucket).replace(".00", "")}`;
    const span = $("#window").selectedOptions[0].textContent;
    $("#chart-note").textContent = `tasks finished ${unit}` + (data.live ? "" : ", to the last one");
    $("#n-rate").textContent = rate >= 10 ? rate.toFixed(0) : rate.toFixed(2);
    $("#n-rate-sub").textContent = data.live ? `tasks/s over the ${span}`
      : `tasks/s, ${span.replace("last ", "final ")}`;
  }

  // -- tasks -------------------------------------------------------------------------

  async function loadTasks() {
    const cursor = state.cursors[state.cursors.length - 1];
    const params = { ...state.filters, order: state.order, limit: state.limit, cursor };
    let page;
    try {
      page = await api("/api/tasks", params);
    } catch (e) {
      if (e.message === "unauthorized") return;
      const line = $("#tasks-error");
      line.textContent = e.message;
      line.hidden = false;
      return;
    }
    $("#tasks-error").hidden = true;
    state.nextCursor = page.next_cursor;
    renderTasks(page);
  }

  function renderTasks(page) {
    const rows = page.tasks.map((t) => {
      const err = t.ename ? `${t.ename}: ${t.evalue || ""}` : "";
      const tr = el("tr", { "data-msg-id": t.msg_id, tabindex: 0,
                            class: t.msg_id === state.openTask ? "selected" : null },
        el("td", { class: "msgid", title: t.msg_id, text: t.msg_id.slice(0, SHORT_ID) }),
        el("td", {}, badge(t.status)),
        el("td", { class: "num", text: t.engine === null ? "–" : t.engine }),
        el("td", { class: "lbl", title: t.label || "", text: t.label || "–" }),
        el("td", { class: "func mono", title: t.func || "", text: t.func || "–" }),
        el("td", { title: isoTime(t.submitted), text: fmtTime(t.submitted) }),
        t.duration === null && t.status === "running" && t.started !== null
          ? el("td", { class: "num muted", title: "still running", text: `${fmtDuration(Date.now() / 1000 - t.started)}…` })
          : el("td", { class: "num", text: fmtDuration(t.duration) }),
        el("td", { class: "err", title: err, text: err }));
      tr.addEventListener("click", () => openTask(t.msg_id));
      tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") openTask(t.msg_id); });
      return tr;
    });
    $("#tasks tbody").replaceChildren(...rows);
    $("#tasks-empty").hidden = rows.length > 0;
    const first = (state.cursors.length - 1) * state.limit;
    $("#tasks-count").textContent = `${fmtInt(page.total)} matching`;
    $("#page-info").textContent = page.total
      ? `${fmtInt(first + 1)}–${fmtInt(first + page.tasks.length)} of ${fmtInt(page.total)}`
      : "";
    $("#prev").disabled = state.cursors.length <= 1;
    $("#first").disabled = state.cursors.length <= 1;
    $("#next").disabled = !state.nextCursor;
    for (const th of document.querySelectorAll("#tasks th[data-sort]")) {
      const key = th.dataset.sort;
      th.classList.toggle("sorted", state.order.replace("-", "") === key);
      th.classList.toggle("asc", state.order === key);
    }
  }

  function restartPaging() {
    state.cursors = [null];
    state.nextCursor = null;
    writeHash();
    loadTasks();
  }

  // from a field's change (when the user leaves it): only a real change reloads;
  // from Apply, Enter or Reset: always
  function applyForm(onlyIfChanged) {
    const next = formFilters();
    if (onlyIfChanged && JSON.stringify(next) === JSON.stringify(state.filters)) return;
    state.filters = next;
    restartPaging();
  }

  function setFilter(name, value) {
    const form = $("#filters");
    form.elements[name].value = value;
    applyForm();
    $("#tasks-title").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  // -- the task view -------------------------------------------------------------------

  async function openTask(msgId) {
    state.openTask = msgId;
    writeHash();
    for (const tr of document.querySelectorAll("#tasks tbody tr")) {
      tr.classList.toggle("selected", tr.dataset.msgId === msgId);
    }
    let data;
    try {
      data = await api(`/api/tasks/${encodeURIComponent(msgId)}`);
    } catch (e) {
      if (e.status === 404) {
        closeTask();
        showBanner(`No task ${msgId} in this history.`);
      }
      return;
    }
    if (state.openTask !== msgId) return;  // another was opened meanwhile
    renderTask(data.task);
    $("#task-view").hidden = false;
    $("#scrim").hidden = false;
  }

  function closeTask() {
    state.openTask = null;
    $("#task-view").hidden = true;
    $("#scrim").hidden = true;
    for (const tr of document.querySelectorAll("#tasks tbody tr.selected")) tr.classList.remove("selected");
    writeHash();
  }

  function facts(dl, pairs) {
    dl.replaceChildren(...pairs.flatMap(([k, v]) => [
      el("dt", { text: k }), v instanceof Node ? el("dd", {}, v) : el("dd", { text: v }),
    ]));
  }

  function renderTask(t) {
    $("#tv-title").textContent = `Task ${t.msg_id.slice(0, SHORT_ID)}`;
    const st = $("#tv-status");
    st.className = `badge ${t.status}`;
    st.textContent = t.status;
    $("#tv-msgid").textContent = t.msg_id;
    facts($("#tv-facts"), [
      ["function", t.func || "–"], ["label", t.label || "–"],
      ["engine", t.engine === null ? "–" : String(t.engine)], ["queue", t.queue || "–"],
      ["client", t.client || "–"], ["retries", String(t.retries || 0)],
      ["request", fmtBytes(t.request_bytes)], ["result", fmtBytes(t.result_bytes)],
    ]);
    const wait = t.started !== null && t.submitted !== null ? t.started - t.submitted : null;
    const ran = t.duration;
    const back = t.received !== null && t.completed !== null ? t.received - t.completed : null;
    const line = $("#tv-timeline");
    const parts = [["wait", wait, "waiting"], ["run", ran, "running"], ["ret", back, "reply"]];
    const sum = parts.reduce((n, [, v]) => n + Math.max(0, v || 0), 0);
    line.replaceChildren(...parts.filter(([, v]) => v && sum > 0).map(([cls, v, what]) => {
      const seg = el("div", { class: cls, title: `${what} ${fmtDuration(v)}` });
      seg.style.width = `${(100 * Math.max(0, v)) / sum}%`;
      return seg;
    }));
    line.hidden = sum <= 0;
    facts($("#tv-times"), [
      ["submitted", fmtTime(t.submitted, true)], ["waited", fmtDuration(wait)],
      ["started", fmtTime(t.started, true)], ["ran", fmtDuration(ran)],
      ["completed", fmtTime(t.completed, true)], ["reply took", fmtDuration(back)],
      ["received", fmtTime(t.received, true)],
      ["total", fmtDuration(t.received !== null && t.submitted !== null ? t.received - t.submitted : null)],
    ]);
    const hasError = Boolean(t.ename || t.traceback);
    $("#tv-error-block").hidden = !hasError;
    $("#tv-error").textContent = hasError ? `${t.ename || "Error"}: ${t.evalue || ""}` : "";
    $("#tv-traceback").textContent = stripAnsi(t.traceback);
    $("#tv-stdout").textContent = stripAnsi(t.stdout);
    $("#tv-stderr").textContent = stripAnsi(t.stderr);
  }

  // -- wiring -----------------------------------------------------------------------------

  let timer = null;
  let tick = 0;

  async function refresh() {
    tick += 1;
    await loadOverview();
    const pm = state.overview && state.overview.mode === "post-mortem";
    // post-mortem data does not change: the first load is enough
    if (pm && tick > 1) return;
    if (tick === 1 || tick % 2 === 0) loadChart();
    // only the first page follows new tasks; later pages stay put while being read
    if (tick > 1 && state.cursors.length === 1) loadTasks();
  }

  function schedule() {
    clearInterval(timer);
    if ($("#auto").checked) timer = setInterval(refresh, 2500);
  }

  function init() {
    readHash();
    const lim = new URLSearchParams(window.location.hash.slice(1)).get("limit");
    if (lim) { state.limit = Number(lim); $("#limit").value = lim; }
    state.limit = Number($("#limit").value);

    let debounce = null;
    const form = $("#filters");
    form.addEventListener("submit", (ev) => { ev.preventDefault(); applyForm(); });
    form.addEventListener("change", (ev) => { if (ev.target.name) applyForm(true); });
    form.elements.search.addEventListener("input", () => {
      clearTimeout(debounce);
      debounce = setTimeout(() => applyForm(true), 350);
    });
    $("#reset").addEventListener("click", () => {
      for (const input of form.elements) if (input.name) input.value = "";
      state.order = "-submitted";
      applyForm();
    });
    for (const th of document.querySelectorAll("#tasks th[data-sort]")) {
      th.addEventListener("click", () => {
        const key = th.dataset.sort;
        state.order = state.order === `-${key}` ? key : `-${key}`;
        restartPaging();
      });
    }
    for (const card of document.querySelectorAll(".card[data-filter-status]")) {
      card.addEventListener("click", () => setFilter("status", card.dataset.filterStatus));
    }
    // a new page starts at the table's head, wherever the last one was left
    const toTable = () => {
      if ($("#tasks-title").getBoundingClientRect().top < 0) $("#tasks-title").scrollIntoView();
    };
    $("#next").addEventListener("click", () => {
      if (!state.nextCursor) return;
      state.cursors.push(state.nextCursor);
      loadTasks().then(toTable);
    });
    $("#prev").addEventListener("click", () => {
      if (state.cursors.length > 1) { state.cursors.pop(); loadTasks().then(toTable); }
    });
    $("#first").addEventListener("click", () => { state.cursors = [null]; loadTasks().then(toTable); });
    $("#limit").addEventListener("change", () => { state.limit = Number($("#limit").value); restartPaging(); });
    $("#window").addEventListener("change", loadChart);
    $("#auto").addEventListener("change", schedule);
    $("#departed").addEventListener("change", () => state.overview && renderEngines(state.overview));
    $("#tv-close").addEventListener("click", closeTask);
    $("#scrim").addEventListener("click", closeTask);
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && state.openTask) closeTask(); });
    window.addEventListener("hashchange", () => {
      const before = JSON.stringify([state.filters, state.order]);
      readHash();
      if (JSON.stringify([state.filters, state.order]) !== before) restartPaging();
      if (state.openTask) openTask(state.openTask); else closeTask();
    });
    window.addEventListener("resize", () => { clearTimeout(debounce); debounce = setTimeout(loadChart, 200); });

    refresh();
    loadTasks();
    if (state.openTask) openTask(state.openTask);
    schedule();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
