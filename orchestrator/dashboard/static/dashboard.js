/* mergesearch dashboard: plain JS over the service's JSON, no build step.
 *
 * The token lives in sessionStorage and goes out as a bearer header on every call; a 401 forgets it and
 * shows the login form. Pages poll (EventSource cannot send the header) and redraw only what changed:
 * the job's tallies are cheap, so curves, table and panels are fetched again only when they move.
 * Every aggregate (curves, pages, lineage) comes from the server; the browser only draws.
 */
"use strict";

const TOKEN_KEY = "mergesearch.token";
const POLL_MS = 2000;
const PANEL_MS = 6000;
const PAGE_SIZE = 25;
const ENDED = ["done", "failed", "cancelled"];
const REFERENCE_STYLE = {
  ideal: { stroke: "#dc2626", width: 2, dash: [7, 4] },
  uniform: { stroke: "#f59e0b", width: 1.5, dash: [5, 4] },
  task_arithmetic: { stroke: "#8b5cf6", width: 1.5, dash: [5, 4] },
  ties: { stroke: "#db2777", width: 1.5, dash: [5, 4] },
  expert: { stroke: "#98a2b3", width: 1.2, dash: [2, 4] },
};

// -- DOM helpers ------------------------------------------------------------------------------------------
const $ = (selector, root = document) => root.querySelector(selector);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  el.append(...children.flat(Infinity).filter((c) => c != null && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(el, attrs);
  el.append(...children.flat().filter((c) => c != null));
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key === "className" ? "class" : key, value === true ? "" : value);
  }
}

const fmt = (v, digits = 3) => (v == null || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const badge = (status) => h("span", { class: `badge ${status}` }, status);
const mean = (scores) => {
  const values = Object.values(scores || {});
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
};

function duration(seconds) {
  if (seconds == null) return "–";
  const t = Math.max(0, Math.round(seconds));
  const [hrs, min, sec] = [Math.floor(t / 3600), Math.floor((t % 3600) / 60), t % 60];
  return hrs ? `${hrs}h ${String(min).padStart(2, "0")}m` : min ? `${min}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

function progressBar(done, total, big = false) {
  const pct = total ? Math.min(100, (100 * done) / total) : 0;
  return h("div", { class: big ? "bar big" : "bar", role: "progressbar", "aria-valuenow": done, "aria-valuemax": total },
    h("div", { style: `width:${pct.toFixed(1)}%` }));
}

function toast(message, bad = false) {
  const el = $("#toast");
  el.textContent = message;
  el.className = bad ? "bad" : "";
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 3500);
}

/* Shows what went wrong with a user's action or a poll; a refused token has already sent them to the login. */
function fail(err) {
  if (!(err instanceof AuthError)) toast(err.message, true);
}

function saveText(filename, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/yaml" }));
  h("a", { href: url, download: filename }).click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function crumbs(items) {
  const nav = $("#crumbs");
  nav.replaceChildren();
  items.forEach(([label, href], i) => {
    if (i) nav.append(h("span", { class: "sep" }, "/"));
    nav.append(href ? h("a", { href }, label) : h("span", {}, label));
  });
}

// -- the token and the API --------------------------------------------------------------------------------
class AuthError extends Error {}
const token = () => sessionStorage.getItem(TOKEN_KEY);
let loginMessage = "";

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${token() || ""}` },
  });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    loginMessage = "The server refused the token; sign in again.";
    route();
    throw new AuthError("unauthorized");
  }
  const json = (response.headers.get("content-type") || "").includes("json");
  const body = json ? await response.json() : await response.text();
  if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : `server said ${response.status}`);
  return body;
}

async function downloadModel(jobId, candidate) {
  const query = candidate == null ? "" : `?candidate=${candidate}`;
  const { url } = await api(`/dashboard/api/jobs/${jobId}/download-link${query}`, { method: "POST" });
  h("a", { href: url, download: "" }).click();
  toast("Preparing the model: the download starts once it is merged.");
}

async function downloadMergekit(jobId, candId) {
  const { mergekit } = await api(`/dashboard/api/jobs/${jobId}/candidates/${candId}`);
  if (!mergekit.yaml) throw new Error(`mergekit cannot express this recipe: ${mergekit.problems.join("; ")}`);
  saveText(`job-${jobId}-candidate-${candId}.mergekit.yaml`, mergekit.yaml);
  if (mergekit.problems.length) toast(`Exported with ${mergekit.problems.length} approximation(s); see the candidate page.`);
}

// -- page lifecycle: timers and charts die with the page ----------------------------------------------------
class Page {
  constructor() { this.alive = true; this.timers = new Set(); this.charts = new Set(); this.onResize = null; }

  every(ms, fn) {
    const tick = async () => {
      this.timers.clear();
      if (!this.alive) return;
      try { await fn(); } catch (err) { if (this.alive) fail(err); }
      if (this.alive) this.timers.add(setTimeout(tick, ms));
    };
    return tick();
  }

  chart(opts, data, el) {
    const chart = new uPlot(opts, data, el);
    this.charts.add(chart);
    return chart;
  }

  drop(chart) { if (chart) { chart.destroy(); this.charts.delete(chart); } }

  stop() {
    this.alive = false;
    this.timers.forEach(clearTimeout);
    this.charts.forEach((c) => c.destroy());
  }
}

let page = null;

function route() {
  page?.stop();
  page = new Page();
  const view = $("#view");
  view.replaceChildren();
  $("#logout").hidden = !token();
  if (!token()) return renderLogin(view);
  const [section, jobId, sub, candId] = location.hash.replace(/^#\/?/, "").split("/");
  const shown = section === "jobs" && sub === "candidates" && candId ? renderCandidate(view, +jobId, +candId)
    : section === "jobs" && jobId ? renderJob(view, +jobId) : renderJobs(view);
  Promise.resolve(shown).catch(fail);
}

// -- login ------------------------------------------------------------------------------------------------
function renderLogin(view) {
  crumbs([]);
  const input = h("input", { id: "token", type: "password", placeholder: "server token", autocomplete: "off", required: true });
  const error = h("div", { class: "error", id: "login-error" }, loginMessage);
  loginMessage = "";
  const submit = async (event) => {
    event.preventDefault();
    const candidate = input.value.trim();
    const response = await fetch("/dashboard/api/jobs", { headers: { Authorization: `Bearer ${candidate}` } });
    if (response.ok) {
      sessionStorage.setItem(TOKEN_KEY, candidate);
      route();
    } else {
      error.textContent = response.status === 401 ? "That token was refused." : `The server said ${response.status}.`;
    }
  };
  view.append(h("form", { class: "card login", id: "login", onsubmit: submit },
    h("h1", {}, "Sign in"),
    h("p", {}, "Paste this server's token: MERGESEARCH_TOKEN, or the one `mergesearch serve` printed at its first start."),
    input, h("button", { type: "submit" }, "Sign in"), error));
  input.focus();
}

// -- jobs list --------------------------------------------------------------------------------------------
function renderJobs(view) {
  crumbs([["jobs"]]);
  const columns = ["id", "name", "strategy", "status", "queue", "evaluations", "best", "elapsed", "remaining", "workers"];
  const numeric = new Set(["id", "queue", "best", "elapsed", "remaining", "workers"]);
  const body = h("tbody");
  view.append(h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Jobs"), h("span", { class: "muted small" }, "updates every 2 s")),
    h("div", { class: "scroll" }, h("table", { class: "data", id: "jobs" },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: numeric.has(c) ? "num" : "" }, c)))), body))));
  page.every(POLL_MS, async () => {
    const jobs = await api("/dashboard/api/jobs");
    body.replaceChildren(...jobs.slice().reverse().map(jobRow));
    if (!jobs.length) {
      body.append(h("tr", {}, h("td", { colspan: columns.length, class: "empty" },
        "No jobs yet: `mergesearch submit job.yaml --server URL` queues one.")));
    }
  });
}

function jobRow(job) {
  const evaluated = job.done + job.failed;
  const open = () => { location.hash = `#/jobs/${job.id}`; };
  return h("tr", { class: "link", dataset: { job: job.id }, onclick: open },
    h("td", { class: "num" }, job.id),
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name)),
    h("td", {}, job.strategy),
    h("td", {}, badge(job.status)),
    h("td", { class: "num" }, job.queue_position ?? ""),
    h("td", {}, h("div", { class: "progress-cell" }, progressBar(evaluated, job.budget),
      h("span", { class: "mono" }, `${evaluated}/${job.budget}`),
      job.failed ? h("span", { class: "small muted" }, `${job.failed} failed`) : null)),
    h("td", { class: "num" }, fmt(job.best_fitness)),
    h("td", { class: "num" }, duration(job.elapsed_s)),
    h("td", { class: "num" }, job.eta_s == null ? "–" : duration(job.eta_s)),
    h("td", { class: "num" }, workersText(job)));
}

const workersText = (job) => (job.status === "running" ? `${job.running} busy${job.workers ? ` / ${job.workers}` : ""}` : "–");

// -- job page ---------------------------------------------------------------------------------------------
function renderJob(view, jobId) {
  crumbs([["jobs", "#/"], [`job ${jobId}`]]);
  const state = { metric: "fitness", order: "fitness", descending: true, status: "", offset: 0, stamp: null,
    detail: null, chart: null, panelChart: null, panelAt: 0 };
  const title = h("h1", { id: "job-title" }, `job ${jobId}`);
  const sub = h("div", { class: "sub" });
  const actions = h("div", { class: "actions" });
  const stats = h("div", { class: "stats", id: "job-stats" });
  const metric = h("select", { id: "metric", "aria-label": "metric" }, h("option", { value: "fitness" }, "mean of tasks (fitness)"));
  const chartEl = h("div", { class: "chart", id: "curve" });
  const panel = h("section", { class: "card", id: "strategy-panel", hidden: true });
  const log = h("ul", { class: "log", id: "log" });
  const statusFilter = h("select", { id: "status-filter", "aria-label": "status" },
    ["", "done", "running", "pending", "failed"].map((v) => h("option", { value: v }, v || "all statuses")));
  const table = h("table", { class: "data", id: "candidates" });
  const pager = h("div", { class: "pager" });
  view.append(
    h("div", { class: "job-head" }, h("div", {}, title, sub), actions),
    stats,
    h("section", { class: "card" },
      h("div", { class: "card-head" }, h("h2", {}, "Fitness against evaluations"), metric), chartEl,
      h("div", { class: "small muted", id: "curve-note" })),
    h("div", { class: "grid2" }, panel,
      h("section", { class: "card" }, h("h2", {}, "Log"), log)),
    h("section", { class: "card", style: "margin-top:18px" },
      h("div", { class: "card-head" }, h("h2", {}, "Archive"), statusFilter),
      h("div", { class: "scroll" }, table), pager));

  metric.addEventListener("change", () => { state.metric = metric.value; drawCurve().catch(fail); });
  statusFilter.addEventListener("change", () => {
    state.status = statusFilter.value;
    state.offset = 0;
    drawTable().catch(fail);
  });
  page.onResize = () => state.chart?.setSize(chartSize(chartEl));

  async function refresh() {
    const detail = await api(`/dashboard/api/jobs/${jobId}`);
    state.detail = detail;
    drawHead(detail.job);
    const job = detail.job;
    const stamp = [job.done, job.failed, job.running, job.pending, job.status].join();
    if (stamp === state.stamp) return;
    state.stamp = stamp;
    if (metric.options.length !== detail.tasks.length + 1) {
      metric.append(...detail.tasks.map((t) => h("option", { value: t }, `task: ${t}`)));
    }
    const panelDue = Date.now() - state.panelAt > PANEL_MS || ENDED.includes(job.status);
    await Promise.all([drawCurve(), drawTable(), drawLog(), panelDue ? drawPanel() : null]);
  }

  function drawHead(job) {
    title.textContent = job.name;
    title.append(" ", badge(job.status));
    const phase = job.status === "running" && job.phase ? ` · ${job.phase}` : "";
    sub.textContent = `job ${job.id} · ${job.strategy} · budget ${job.budget}${phase}` +
      (job.error ? ` · ${job.error}` : "");
    const act = (label, cls, enabled, fn, id) => h("button", {
      class: cls, id, disabled: !enabled, type: "button",
      onclick: () => fn().catch(fail),
    }, label);
    const hasBest = job.best_fitness != null;
    actions.replaceChildren(
      act("Download best model", "", hasBest, () => downloadModel(jobId), "download-best"),
      act("mergekit YAML", "secondary", hasBest, async () => {
        const best = await api(`/jobs/${jobId}/best`);
        await downloadMergekit(jobId, best.id);
      }, "mergekit-best"),
      act("Resume", "secondary", ["cancelled", "failed"].includes(job.status), async () => {
        await api(`/jobs/${jobId}/resume`, { method: "POST" });
        toast(`Job ${jobId} queued again.`);
        state.stamp = null;
        await refresh();
      }, "resume"),
      act("Cancel", "danger", ["queued", "running"].includes(job.status), async () => {
        if (!confirm(`Cancel job ${jobId}? Its archived candidates stay.`)) return;
        await api(`/jobs/${jobId}/cancel`, { method: "POST" });
        toast(`Cancelling job ${jobId}.`);
        await refresh();
      }, "cancel"));
    const evaluated = job.done + job.failed;
    const stat = (label, value, extra = null, cls = "") => h("div", { class: "stat" },
      h("div", { class: "label" }, label), h("div", { class: `value ${cls}` }, value), extra);
    stats.replaceChildren(
      stat("evaluations", `${evaluated} / ${job.budget}`, progressBar(evaluated, job.budget, true)),
      stat("best fitness", fmt(job.best_fitness), null, "good"),
      stat("failed", job.failed),
      stat("elapsed", duration(job.elapsed_s)),
      stat("remaining", job.status === "queued" ? `#${job.queue_position ?? "–"} in queue` : duration(job.eta_s)),
      stat("workers busy", workersText(job)));
  }

  async function drawCurve() {
    const curve = await api(`/dashboard/api/jobs/${jobId}/curve?metric=${encodeURIComponent(state.metric)}`);
    chartEl.dataset.evaluations = curve.evaluations;
    chartEl.dataset.points = curve.n.length;
    chartEl.dataset.metric = curve.metric;
    $("#curve-note").textContent = curve.window > 1
      ? `Median and quartiles over windows of ${curve.window} evaluations (computed by the database).` : "";
    if (!curve.n.length) {
      page.drop(state.chart);
      state.chart = null;
      chartEl.replaceChildren(h("div", { class: "empty" }, "No finished candidates yet."));
      return;
    }
    const lines = referenceLines(state.detail, state.metric);
    const windowed = curve.window > 1;  // a window of one evaluation has no spread to draw
    const data = [curve.n, curve.best, curve.median, ...(windowed ? [curve.q1, curve.q3] : []),
      ...lines.map((l) => curve.n.map(() => l.value))];
    const key = `${state.metric}|${windowed}|${lines.map((l) => l.label).join()}`;
    if (state.chart && state.chart.key === key) {
      state.chart.setData(data);
      return;
    }
    page.drop(state.chart);
    chartEl.replaceChildren();
    const few = curve.n.length < 40;
    state.chart = page.chart({
      ...chartSize(chartEl),
      scales: { x: { time: false } },
      legend: { live: false },
      axes: [{ label: "evaluations" }, { label: state.metric === "fitness" ? "fitness (mean dev score)" : `dev score: ${state.metric}` }],
      series: [
        { label: "evaluations" },
        { label: "best so far", stroke: "#2563eb", width: 2.5, points: { show: few } },
        { label: windowed ? "median of each window" : "each evaluation", stroke: "#0d9488", width: 1.5, points: { show: few, size: 4 } },
        ...(windowed ? [{ label: "lower quartile", stroke: "rgba(13,148,136,0.35)", width: 1 },
          { label: "upper quartile", stroke: "rgba(13,148,136,0.35)", width: 1 }] : []),
        ...lines.map((l) => ({ label: l.label, points: { show: false }, ...l.style })),
      ],
      bands: windowed ? [{ series: [4, 3], fill: "rgba(13,148,136,0.10)" }] : [],
    }, data, chartEl);
    state.chart.key = key;
  }

  async function drawTable() {
    const query = new URLSearchParams({ order: state.order, descending: state.descending, limit: PAGE_SIZE, offset: state.offset });
    if (state.status) query.set("status", state.status);
    const result = await api(`/dashboard/api/jobs/${jobId}/candidates?${query}`);
    const tasks = state.detail?.tasks || [];
    const best = state.detail?.job.best_search_fitness;
    const columns = [["id", "id"], ["gen", "generation"], ["status"], ["fitness", "fitness"],
      ...tasks.map((t) => [t]), ["sparsity", "sparsity"], ["worker"], ["finished"]];
    const sortBy = (key) => {
      state.descending = state.order === key ? !state.descending : true;
      state.order = key;
      state.offset = 0;
      drawTable().catch(fail);
    };
    const head = h("tr", {}, columns.map(([label, key]) => {
      const sorted = key && key === state.order;
      const cls = [key ? "sortable" : "", sorted ? "sorted" : "", sorted && !state.descending ? "asc" : "",
        label === "status" || label === "worker" || label === "finished" ? "" : "num"].join(" ").trim();
      return h("th", { class: cls, dataset: key ? { sort: key } : {}, onclick: key ? () => sortBy(key) : null }, label);
    }));
    const rows = result.items.map((c) => h("tr", {
      class: `link${c.fitness != null && c.fitness === best ? " best" : ""}`, dataset: { candidate: c.id },
      onclick: () => { location.hash = `#/jobs/${jobId}/candidates/${c.id}`; },
    },
    h("td", { class: "num" }, c.id), h("td", { class: "num" }, c.generation), h("td", {}, badge(c.status)),
    h("td", { class: "num fitness" }, fmt(c.fitness)),
    tasks.map((t) => h("td", { class: "num" }, fmt(c.dev?.[t]))),
    h("td", { class: "num" }, fmt(c.sparsity)),
    h("td", { class: "mono small" }, c.worker && c.worker !== "pending" ? c.worker : ""),
    h("td", { class: "small muted" }, c.finished_at ? c.finished_at.replace("T", " ").slice(0, 19) : "")));
    table.replaceChildren(h("thead", {}, head), h("tbody", {}, rows));
    const first = result.total ? result.offset + 1 : 0;
    const last = result.offset + result.items.length;
    const move = (offset) => { state.offset = offset; drawTable().catch(fail); };
    pager.replaceChildren(
      h("span", { class: "muted", id: "page-info" }, `${first}–${last} of ${result.total}`),
      h("button", { class: "secondary", type: "button", disabled: result.offset === 0, onclick: () => move(Math.max(0, result.offset - PAGE_SIZE)) }, "‹ Previous"),
      h("button", { class: "secondary", type: "button", disabled: last >= result.total, onclick: () => move(result.offset + PAGE_SIZE) }, "Next ›"));
  }

  async function drawLog() {
    const events = await api(`/jobs/${jobId}/events?limit=12`);
    log.replaceChildren(...events.map((e) => h("li", { class: e.level },
      h("time", {}, e.at.replace("T", " ").slice(11, 19)), e.message)));
  }

  async function drawPanel() {
    state.panelAt = Date.now();
    const info = await api(`/dashboard/api/jobs/${jobId}/strategy`);
    page.drop(state.panelChart);
    state.panelChart = null;
    panel.hidden = !info.kind;
    if (!info.kind) return;
    const body = h("div", { class: "chart-small" });
    const titles = { sae: "SAE sparsity schedule", pso: "PSO swarm spread", rmm: "RMM merge map (current policy)" };
    panel.replaceChildren(h("h2", {}, titles[info.kind]), body);
    const size = { width: Math.max(300, panel.clientWidth - 40), height: 230 };
    if (info.kind === "sae") {
      const data = uPlot.join([[info.schedule.generation, info.schedule.target],
        [info.measured.generation, info.measured.sparsity]]);
      state.panelChart = page.chart({ ...size, scales: { x: { time: false } }, legend: { live: false },
        axes: [{ label: "generation" }, { label: "sparsity" }],
        series: [{ label: "generation" }, { label: "target s(t)", stroke: "#8b5cf6", width: 2 },
          { label: "measured (mean)", stroke: "#0d9488", width: 0, points: { show: true, size: 6, fill: "#0d9488" } }],
      }, data, body);
      panel.append(h("div", { class: "small muted" }, `now at generation ${info.generation}`));
    } else if (info.kind === "pso") {
      if (!info.iteration.length) return body.append(h("div", { class: "empty" }, "No iteration yet."));
      state.panelChart = page.chart({ ...size, scales: { x: { time: false } }, legend: { live: false },
        axes: [{ label: "iteration" }, { label: "RMS distance to centroid" }],
        series: [{ label: "iteration" }, { label: "spread", stroke: "#2563eb", width: 2, points: { show: info.iteration.length < 40 } }],
      }, [info.iteration, info.spread], body);
    } else if (info.merge_map) {
      const m = info.merge_map;
      body.append(heatmap(m.layers, [], m.sources, m.counts), h("div", { class: "small muted" },
        "Output layers the policy places from each source at each source layer."));
    } else {
      body.append(h("div", { class: "empty" }, "The agent has no checkpoint yet."));
    }
  }

  page.every(POLL_MS, refresh);
}

function chartSize(el) {
  return { width: Math.max(320, el.clientWidth || el.parentElement.clientWidth - 40), height: 320 };
}

function referenceLines(detail, metric) {
  if (!detail) return [];
  const valueOf = (scores, fitness) => (metric === "fitness" ? fitness ?? mean(scores) : scores?.[metric]);
  const lines = [];
  const ideal = valueOf(detail.ideal?.dev, detail.ideal?.fitness);
  if (ideal != null) lines.push({ label: "ideal (best expert per task)", value: ideal, style: REFERENCE_STYLE.ideal });
  for (const [name, ref] of Object.entries(detail.references || {})) {
    const value = valueOf(ref.dev, ref.fitness);
    if (value == null) continue;
    const style = name.startsWith("expert:") ? REFERENCE_STYLE.expert : REFERENCE_STYLE[name] || REFERENCE_STYLE.uniform;
    lines.push({ label: name, value, style });
  }
  return lines;
}

// -- candidate page ---------------------------------------------------------------------------------------
async function renderCandidate(view, jobId, candId) {
  crumbs([["jobs", "#/"], [`job ${jobId}`, `#/jobs/${jobId}`], [`candidate ${candId}`]]);
  const current = page;
  const [detail, job] = await Promise.all([
    api(`/dashboard/api/jobs/${jobId}/candidates/${candId}`), api(`/dashboard/api/jobs/${jobId}`)]);
  if (page !== current) return;
  const c = detail.candidate;
  const timings = c.timings || {};
  const dev = c.info?.dev_full || c.dev;
  view.replaceChildren(h("div", {},
    h("div", { class: "job-head" },
      h("div", {}, h("h1", { id: "candidate-title" }, c.name || `candidate ${c.id}`, " ", badge(c.status)),
        h("div", { class: "sub" }, [`job ${jobId}`, c.kind, c.number != null ? `number ${c.number}` : null,
          `generation ${c.generation}`, c.worker && c.worker !== "pending" ? `worker ${c.worker}` : null].filter(Boolean).join(" · "))),
      h("div", { class: "actions" },
        h("button", { type: "button", id: "download-candidate", disabled: c.status !== "done",
          onclick: () => downloadModel(jobId, c.id).catch(fail) }, "Download model"),
        h("button", { type: "button", class: "secondary", id: "mergekit-candidate", disabled: !detail.mergekit.yaml,
          onclick: () => saveText(`job-${jobId}-candidate-${c.id}.mergekit.yaml`, detail.mergekit.yaml) }, "mergekit YAML"))),
    h("div", { class: "stats" },
      [["fitness", fmt(c.fitness), "good"], ["sparsity", fmt(c.sparsity)], ["test mean", fmt(mean(c.test))],
        ["attempts", c.attempts], ["merge time", timings.materialize != null ? `${fmt(timings.materialize, 2)} s` : "–"],
        ["eval time", timings.evaluate != null ? `${fmt(timings.evaluate, 2)} s` : "–"]]
        .map(([label, value, cls]) => h("div", { class: "stat" }, h("div", { class: "label" }, label),
          h("div", { class: `value ${cls || ""}` }, value)))),
    c.error ? h("section", { class: "card error" }, c.error) : null,
    h("div", { class: "grid2" },
      h("section", { class: "card" }, h("h2", {}, "Scores per task"), scoresTable(job, c, dev)),
      h("section", { class: "card lineage", id: "lineage" }, h("h2", {}, "Lineage"), lineageSvg(detail.lineage, c.id, jobId))),
    h("section", { class: "card", style: "margin-top:18px" },
      h("div", { class: "card-head" }, h("h2", {}, "Recipe: coefficients per layer and operator"),
        h("span", { class: "small muted" }, "colour per parameter: red below 0, blue above")),
      h("div", { class: "scroll", id: "recipe-heatmap" },
        heatmap(detail.heatmap.rows, [detail.heatmap.sources.map((v) => v ?? ""), detail.heatmap.ops],
          detail.heatmap.columns, detail.heatmap.values, ["from", "op"]))),
    h("section", { class: "card" }, h("h2", {}, "mergekit YAML"),
      detail.mergekit.yaml ? h("pre", { class: "yaml", id: "mergekit" }, detail.mergekit.yaml) : null,
      detail.mergekit.problems.length
        ? h("ul", { class: "problems" }, detail.mergekit.problems.map((p) => h("li", {}, p))) : null),
    h("section", { class: "card" }, h("details", {}, h("summary", {}, "recipe and strategy info (JSON)"),
      h("pre", { class: "mono" }, JSON.stringify({ recipe: c.recipe, info: c.info, parents: c.parents }, null, 2))))));
  if (!ENDED.includes(c.status)) {
    page.timers.add(setTimeout(() => { if (page === current) route(); }, POLL_MS));
  }
}

function scoresTable(job, c, dev) {
  const ideal = job.ideal || {};
  const tasks = job.tasks.length ? job.tasks : Object.keys(c.dev || {});
  const full = Boolean(c.info?.dev_full);
  const row = (label, d, t, idealDev, idealTest, cls = "") => h("tr", { class: cls },
    h("td", {}, label), h("td", { class: "num" }, fmt(d)), h("td", { class: "num" }, fmt(t)),
    h("td", { class: "num muted" }, fmt(idealDev)), h("td", { class: "num muted" }, fmt(idealTest)));
  return h("table", { class: "data", id: "scores" },
    h("thead", {}, h("tr", {}, h("th", {}, "task"), h("th", { class: "num" }, full ? "dev (full split)" : "dev"),
      h("th", { class: "num" }, "test"), h("th", { class: "num" }, "ideal dev"), h("th", { class: "num" }, "ideal test"))),
    h("tbody", {}, tasks.map((t) => row(t, dev?.[t], c.test?.[t], ideal.dev?.[t], ideal.test?.[t])),
      row("mean", mean(dev), mean(c.test), mean(ideal.dev), mean(ideal.test), "best")));
}

/* A table heatmap: one row per label, leading text columns, then numeric columns coloured per parameter
 * group (the name before "·" or "["), diverging around 0. Text cells stay grey. */
function heatmap(rowLabels, leading, columns, values, leadingNames = []) {
  const group = (name) => name.split(/[·[]/)[0];
  const extent = {};
  columns.forEach((name, j) => values.forEach((row) => {
    const v = row[j];
    if (typeof v !== "number") return;
    const e = (extent[group(name)] ||= { lo: 0, hi: 0 });
    e.lo = Math.min(e.lo, v);
    e.hi = Math.max(e.hi, v);
  }));
  const colour = (name, v) => {
    const { lo, hi } = extent[group(name)];
    const t = v >= 0 ? (hi ? v / hi : 0) : (lo ? v / lo : 0);
    const [r, g, b] = v >= 0 ? [33, 102, 172] : [178, 24, 43];
    const mix = (c) => Math.round(247 + (c - 247) * t);
    return { background: `rgb(${mix(r)},${mix(g)},${mix(b)})`, color: t > 0.55 ? "#fff" : "#1c2433" };
  };
  const head = h("tr", {}, h("th", {}), leadingNames.map((n) => h("th", {}, n)), columns.map((c) => h("th", {}, c)));
  const body = rowLabels.map((label, i) => h("tr", {}, h("th", { class: "right" }, label),
    leading.map((col) => h("td", { class: "op" }, col[i])),
    columns.map((name, j) => {
      const v = values[i][j];
      if (v == null) return h("td", {});
      if (typeof v !== "number") return h("td", { class: "text" }, v);
      const { background, color } = colour(name, v);
      return h("td", { style: `background:${background};color:${color}`, title: `${label} ${name} = ${v}` },
        Math.abs(v) >= 100 ? v.toFixed(0) : Number(v.toFixed(2)));
    })));
  return h("table", { class: "heatmap" }, h("thead", {}, head), h("tbody", {}, body));
}

/* Ancestors drawn as a layered graph: one row per generation (seeds on top, the candidate at the bottom),
 * edges from parent to child, nodes coloured by fitness; a click opens that candidate. */
function lineageSvg(lineage, currentId, jobId) {
  const { nodes, edges, truncated } = lineage;
  if (nodes.length === 1) return h("p", { class: "muted" }, "No parents: a seed of the search (drawn at random, or an initial model).");
  const generations = [...new Set(nodes.map((n) => n.generation))].sort((a, b) => a - b);
  const rows = generations.map((g) => nodes.filter((n) => n.generation === g).sort((a, b) => a.number - b.number));
  const width = 640;
  const rowHeight = 70;
  const widest = Math.max(...rows.map((r) => r.length));
  const step = Math.min(96, (width - 40) / Math.max(widest, 1));
  const position = {};
  rows.forEach((row, r) => row.forEach((n, i) => {
    position[n.id] = { x: width / 2 + (i - (row.length - 1) / 2) * step, y: 28 + r * rowHeight };
  }));
  const fitness = nodes.map((n) => n.fitness).filter((f) => f != null);
  const [lo, hi] = [Math.min(...fitness), Math.max(...fitness)];
  const fill = (f) => {
    if (f == null) return "#d0d5dd";
    const t = hi > lo ? (f - lo) / (hi - lo) : 1;
    return `hsl(${Math.round(200 - 70 * t)}, 70%, ${Math.round(78 - 38 * t)}%)`;
  };
  const height = 28 + (rows.length - 1) * rowHeight + 34;
  const paths = edges.map(([from, to]) => {
    const [a, b] = [position[from], position[to]];
    const mid = (a.y + b.y) / 2;
    return s("path", { class: "edge", d: `M${a.x},${a.y} C${a.x},${mid} ${b.x},${mid} ${b.x},${b.y}` });
  });
  const labels = step >= 38;
  const circles = nodes.map((n) => {
    const { x, y } = position[n.id];
    const current = n.id === currentId;
    return s("g", { class: "node", dataset: { candidate: n.id },
      onclick: () => { location.hash = `#/jobs/${jobId}/candidates/${n.id}`; } },
    s("title", {}, `candidate ${n.id} · generation ${n.generation} · fitness ${fmt(n.fitness)}`),
    s("circle", { cx: x, cy: y, r: current ? 12 : 9, fill: fill(n.fitness),
      stroke: current ? "#111827" : "#fff", "stroke-width": current ? 3 : 1.5 }),
    labels || current ? s("text", { x, y: y + 24, "text-anchor": "middle" }, `#${n.id}`) : null);
  });
  const genLabels = rows.map((row, r) => s("text", { x: 4, y: 32 + r * rowHeight, class: "muted", fill: "#98a2b3", "font-size": 11 },
    `gen ${generations[r]}`));
  return h("div", {},
    s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "lineage graph" }, genLabels, paths, circles),
    h("div", { class: "small muted" }, `${nodes.length} candidates` + (truncated ? " (truncated: oldest ancestors left out)" : "") +
      " · colour: fitness, darker is better"));
}

// -- start ------------------------------------------------------------------------------------------------
$("#logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.hash = "#/";
  route();
});
window.addEventListener("hashchange", route);
window.addEventListener("resize", () => page?.onResize?.(), { passive: true });
route();
