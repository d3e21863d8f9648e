// sftlab ui: plain JS, no dependencies. Every string from a run, a model or a rater enters the page
// as a text node (el() below), never as HTML, so an answer holding <script> shows as text.
"use strict";

const DIMENSIONS = ["helpfulness", "accuracy", "fluency", "harmlessness"];
const SIDES = ["left", "right"];
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  return body;
}

const fmt = (v, digits = 4) => (v == null || Number.isNaN(v) ? "–" : Number(v).toPrecision(digits));
const pct = (v) => (v == null ? "–" : (100 * v).toFixed(1) + "%");
const setRows = (tbody, rows) => tbody.replaceChildren(...rows);
const cells = (values, cls) => values.map((v) => (v instanceof Node && v.tagName === "TD" ? v : el("td", cls ? { class: cls } : {}, v)));

// ---------------------------------------------------------------- charts

// A line chart on a canvas; series: [{label, color, points: [[x, y]], dots}]. data-points counts what was drawn.
function lineChart(canvas, series, logY) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = { l: 64, r: 12, t: 24, b: 32 };
  ctx.clearRect(0, 0, W, H);
  const all = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y) && (!logY || y > 0));
  canvas.dataset.points = String(all.length);
  ctx.font = "12px system-ui, sans-serif";
  if (!all.length) {
    ctx.fillStyle = "#888";
    ctx.fillText("no data yet", W / 2 - 30, H / 2);
    return;
  }
  const ty = logY ? Math.log10 : (y) => y;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => ty(p[1]))), Math.max(...all.map((p) => ty(p[1])))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - ((ty(y) - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#ddd"; ctx.fillStyle = "#555";
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4, y = H - pad.b - (i / 4) * (H - pad.t - pad.b);
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(W - pad.r, y); ctx.stroke();
    ctx.fillText(Number(logY ? 10 ** v : v).toPrecision(3), 4, y + 4);
  }
  for (let i = 0; i <= 4; i++) {
    const v = x0 + ((x1 - x0) * i) / 4;
    ctx.fillText(String(Math.round(v)), X(v) - 8, H - pad.b + 16);
  }
  ctx.fillText("step", W - pad.r - 30, H - 4);
  let legendX = pad.l;
  for (const s of series) {
    const pts = s.points.filter(([, y]) => Number.isFinite(y) && (!logY || y > 0));
    ctx.strokeStyle = ctx.fillStyle = s.color; ctx.lineWidth = 1.5;
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.dots) for (const [x, y] of pts) { ctx.beginPath(); ctx.arc(X(x), Y(y), 3, 0, 7); ctx.fill(); }
    ctx.fillRect(legendX, 8, 10, 10);
    ctx.fillStyle = "#333"; ctx.fillText(s.label, legendX + 14, 17);
    legendX += 24 + ctx.measureText(s.label).width;
  }
}

// ---------------------------------------------------------------- runs dashboard

const statusBadge = (s) => el("span", { class: `status ${s.status}`, title: s.error || "" }, s.status);

async function pageRuns() {
  const refresh = async () => {
    try {
      const runs = await api("/api/runs");
      $("no-runs").hidden = runs.length > 0;
      setRows($("runs").tBodies[0], runs.map((r) => el("tr", { dataset: { run: r.name } }, ...cells([
        el("td", {}, el("a", { href: `/run?name=${encodeURIComponent(r.name)}` }, r.name)),
        el("td", {}, statusBadge(r)), r.task, r.method, r.model,
        el("td", { class: "num" }, r.total_steps ? `${r.step} / ${r.total_steps}` : r.step),
        el("td", { class: "num" }, fmt(r.loss)), el("td", { class: "num" }, fmt(r.eval_loss)),
        el("td", {}, r.has_report ? el("a", { href: `/runs/${encodeURIComponent(r.name)}/report` }, "report") : ""),
      ]))));
      const { studies, problems } = await api("/api/studies");
      $("no-studies").hidden = studies.length > 0;
      setRows($("studies").tBodies[0], studies.map((s) => el("tr", { dataset: { study: s.id } }, ...cells([
        el("td", { title: s.source }, `${s.name}: ${s.model_a} vs ${s.model_b}`),
        el("td", { class: "num" }, s.items), el("td", { class: "num" }, s.gold_items),
        el("td", { class: "num" }, s.ratings), el("td", { class: "num" }, s.annotators),
        el("td", {}, el("a", { href: `/rate?study=${encodeURIComponent(s.id)}` }, "rate")),
        el("td", {}, el("a", { href: `/results?study=${encodeURIComponent(s.id)}` }, "results")),
      ]))));
      setRows($("problems"), problems.map((p) => el("li", {}, p)));
      showError("");
    } catch (e) { showError(`could not load: ${e.message}`); }
  };
  await refresh();
  setInterval(refresh, 3000);
}

// ---------------------------------------------------------------- one run

async function pageRun() {
  const name = params.get("name") || "";
  const base = `/api/runs/${encodeURIComponent(name)}`;
  $("run-name").textContent = name;
  let rows = [], offset = 0, status = "running";
  const draw = () => {
    const series = (key) => rows.filter((r) => key in r).map((r) => [r.step, r[key]]);
    const palette = ["#16a34a", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563"];
    const perDataset = [...new Set(rows.flatMap((r) => Object.keys(r)).filter((k) => k.startsWith("eval_loss/")))]
      .map((k, i) => ({ label: `eval ${k.slice(10)}`, color: palette[i % palette.length], points: series(k), dots: true }));
    lineChart($("chart-loss"), [{ label: "train loss", color: "#2563eb", points: series("loss") },
      { label: "eval loss", color: "#ea580c", points: series("eval_loss"), dots: true }, ...perDataset]);
    lineChart($("chart-lr"), [{ label: "learning rate", color: "#6b7280", points: series("learning_rate") }]);
    lineChart($("chart-grad"), [{ label: "grad norm", color: "#7c3aed", points: series("grad_norm") }], true);
  };
  const pollMetrics = async () => {
    const got = await api(`${base}/metrics?offset=${offset}`);
    rows = got.reset ? got.rows : rows.concat(got.rows);
    offset = got.next;
    if (got.rows.length || got.reset) draw();
  };
  const pollDetails = async () => {
    const d = await api(base);
    status = d.status;
    $("run-status").replaceChildren(statusBadge(d));
    $("run-progress").textContent = `step ${d.step}${d.total_steps ? " of " + d.total_steps : ""}`;
    $("run-error").textContent = d.error || "";
    const link = $("report-link");
    link.hidden = !d.has_report;
    link.href = `/runs/${encodeURIComponent(name)}/report`;
    $("config").textContent = d.config;
    renderEval(d.eval);
    renderData(d.data_report || {});
  };
  const tick = async () => {
    try { await pollDetails(); await pollMetrics(); showError(""); } catch (e) { showError(e.message); }
    setTimeout(tick, status === "running" ? 2000 : 10000);
  };
  draw();
  await tick();
}

function renderEval(ev) {
  $("no-eval").hidden = !!ev;
  const table = $("eval");
  if (!ev) { table.tHead.replaceChildren(); setRows(table.tBodies[0], []); return; }
  const tuned = ev.models.model.metrics, base = ev.models.base && ev.models.base.metrics;
  table.tHead.replaceChildren(el("tr", {}, ...["metric", ...(base ? ["base", "tuned", "delta"] : ["value"])].map((h) => el("th", {}, h))));
  setRows(table.tBodies[0], Object.entries(tuned).map(([k, v]) => el("tr", {}, el("td", {}, k),
    ...(base ? [base[k], v, (ev.delta || {})[k]] : [v]).map((x) => el("td", { class: "num" }, fmt(x))))));
}

function renderData(report) {
  const rows = [];
  for (const [split, files] of Object.entries(report)) {
    for (const f of files) {
      const dropped = Object.entries(f.dropped || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "0";
      rows.push(el("tr", {}, ...cells([split, f.name, f.format, f.read, f.kept, f.truncated, dropped,
        `${f.supervised_kept ?? "–"} / ${f.supervised_lost ?? "–"}`])));
    }
  }
  setRows($("data").tBodies[0], rows);
}

// ---------------------------------------------------------------- blind rating

async function pageRate() {
  const study = params.get("study") || "";
  const base = `/api/studies/${encodeURIComponent(study)}`;
  $("results-link").href = `/results?study=${encodeURIComponent(study)}`;
  let name = localStorage.getItem("sftlab-annotator") || "";
  let item = null, shownAt = 0, active = 0;
  let scores = { left: {}, right: {} }, pref = null;
  const order = SIDES.flatMap((side) => DIMENSIONS.map((dim) => [side, dim]));

  const tbody = $("scores").tBodies[0];
  setRows(tbody, DIMENSIONS.map((dim) => el("tr", {}, el("th", {}, dim), ...SIDES.map((side) => el("td",
    { dataset: { side, dim } }, ...[1, 2, 3, 4, 5].map((v) => el("button", { type: "button", dataset: { v },
      onclick: () => { setScore(side, dim, v); active = order.findIndex(([s, d]) => s === side && d === dim); next(); } }, v)))))));
  document.querySelectorAll("button.pref").forEach((b) => b.addEventListener("click", () => setPref(b.dataset.pref)));
  $("submit").addEventListener("click", submit);

  function paint() {
    for (const td of tbody.querySelectorAll("td")) {
      const { side, dim } = td.dataset;
      td.classList.toggle("active", order[active][0] === side && order[active][1] === dim);
      for (const b of td.querySelectorAll("button")) b.classList.toggle("on", scores[side][dim] === Number(b.dataset.v));
    }
    document.querySelectorAll("button.pref").forEach((b) => b.classList.toggle("on", b.dataset.pref === pref));
  }
  function setScore(side, dim, v) { scores[side][dim] = v; paint(); }
  function setPref(p) { pref = p; paint(); }
  function next() { active = Math.min(order.length - 1, active + 1); paint(); }
  function missing() {
    const out = order.filter(([s, d]) => !scores[s][d]).map(([s, d]) => `${s === "left" ? "A" : "B"} ${d}`);
    return pref ? out : out.concat("preference");
  }

  function show(next) {
    const { done, total } = next.progress;
    $("bar").style.width = total ? `${(100 * done) / total}%` : "0";
    $("progress-text").textContent = `${done} of ${total} rated`;
    $("rater").hidden = !!next.done;
    $("done").hidden = !next.done;
    if (next.done) return;
    item = next.item;
    $("prompt").textContent = next.prompt;
    $("answer-left").textContent = next.left;
    $("answer-right").textContent = next.right;
    scores = { left: {}, right: {} }; pref = null; active = 0; shownAt = performance.now();
    $("missing").textContent = "";
    paint();
  }

  async function submit() {
    const gaps = missing();
    if (gaps.length) { $("missing").textContent = `still to rate: ${gaps.join(", ")}`; return; }
    const button = $("submit");
    button.disabled = true;  // one rating per click, even on a double click
    try {
      show(await api(`${base}/ratings`, { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ annotator: name, item, preference: pref, left: scores.left, right: scores.right,
          seconds: (performance.now() - shownAt) / 1000 }) }));
      showError("");
    } catch (e) { showError(e.message); } finally { button.disabled = false; }
  }

  document.addEventListener("keydown", (e) => {
    if ($("rater").hidden || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
    const [side, dim] = order[active];
    if (/^[1-5]$/.test(e.key)) { setScore(side, dim, Number(e.key)); next(); }
    else if (e.key === "ArrowDown") { active = Math.min(order.length - 1, active + 1); paint(); }
    else if (e.key === "ArrowUp") { active = Math.max(0, active - 1); paint(); }
    else if (e.key === "ArrowRight" || e.key === "ArrowLeft") { active = (active + 4) % order.length; paint(); }
    else if (e.key === "a" || e.key === "b" || e.key === "t") setPref({ a: "left", b: "right", t: "tie" }[e.key]);
    else if (e.key === "Enter") submit();
    else return;
    e.preventDefault();
  });

  async function start() {
    $("who").replaceChildren(`rating as ${name} `, el("a", { href: "#", onclick: (e) => {
      e.preventDefault(); localStorage.removeItem("sftlab-annotator"); location.reload(); } }, "(not you?)"));
    try { show(await api(`${base}/next?annotator=${encodeURIComponent(name)}`)); } catch (e) { showError(e.message); }
  }
  $("name-form").addEventListener("submit", (e) => {
    e.preventDefault();
    name = $("name").value.trim();
    if (!name) return;
    localStorage.setItem("sftlab-annotator", name);
    $("name-form").hidden = true;
    start();
  });
  if (name) start(); else $("name-form").hidden = false;
}

// ---------------------------------------------------------------- results

async function pageResults() {
  const study = params.get("study") || "";
  const base = `/api/studies/${encodeURIComponent(study)}`;
  $("export-csv").href = `${base}/export.csv`;
  $("export-json").href = `${base}/export.json`;
  const load = async () => {
    try {
      const r = await api(`${base}/results?exclude_flagged=${$("exclude-flagged").checked}`);
      render(r);
      showError("");
    } catch (e) { showError(e.message); }
  };
  $("exclude-flagged").addEventListener("change", load);
  await load();
}

function render(r) {
  const a = r.study.model_a, b = r.study.model_b, p = r.preference;
  $("study-name").textContent = `${r.study.name}: ${a} vs ${b}`;
  $("study-source").textContent = `${r.study.source} · ${r.ratings} ratings (gold questions not counted)`;
  const ci = p.ci95 ? `${pct(p.ci95[0])} – ${pct(p.ci95[1])}` : "–";
  setRows($("preference").tBodies[0], [
    el("tr", {}, el("th", {}, `${a} preferred`), el("td", { class: "num", id: "a-wins" }, p.a_wins)),
    el("tr", {}, el("th", {}, `${b} preferred`), el("td", { class: "num", id: "b-wins" }, p.b_wins)),
    el("tr", {}, el("th", {}, "ties"), el("td", { class: "num", id: "ties" }, p.ties)),
    el("tr", {}, el("th", {}, `win rate of ${a} (ties count half)`), el("td", { class: "num", id: "win-rate" }, pct(p.win_rate_a))),
    el("tr", {}, el("th", {}, "95% interval (Wilson)"), el("td", { class: "num", id: "win-ci" }, ci)),
  ]);
  const sc = $("scores");
  sc.tHead.replaceChildren(el("tr", {}, el("th", {}, "dimension"), el("th", {}, a), el("th", {}, b)));
  const cell = (m, id) => el("td", { class: "num", id }, m.mean == null ? "–" :
    `${m.mean.toFixed(2)}${m.ci95 ? ` (${m.ci95[0].toFixed(2)}–${m.ci95[1].toFixed(2)})` : ""}`);
  setRows(sc.tBodies[0], DIMENSIONS.map((d) => el("tr", {}, el("th", {}, d),
    cell(r.scores[d].a, `score-${d}-a`), cell(r.scores[d].b, `score-${d}-b`))));
  const ag = r.agreement;
  const names = { cohen_kappa: "Cohen's kappa", krippendorff_alpha: "Krippendorff's alpha (nominal)" };
  $("agreement").textContent = ag.method
    ? `${names[ag.method]} on the preference: ${ag.value == null ? "undefined (one category only)" : ag.value.toFixed(3)} (${ag.raters} raters, ${ag.items} items rated by two or more)`
    : `${ag.note} (${ag.raters} raters so far)`;
  $("agreement").dataset.value = ag.value == null ? "" : String(ag.value);
  setRows($("raters").tBodies[0], r.annotators.map((x) => el("tr", {}, ...cells([x.name, x.ratings,
    x.gold_answered ? `${x.gold_correct} / ${x.gold_answered}` : "–",
    el("td", { class: x.flagged ? "flag" : "" }, x.flagged ? "careless? (missed gold questions)" : ""),
    el("td", { class: "num" }, (x.seconds / Math.max(1, x.ratings + x.gold_answered)).toFixed(1))]))));
}

const PAGES = { runs: pageRuns, run: pageRun, rate: pageRate, results: pageResults };
PAGES[document.body.dataset.page]();
