// Conveyor dashboard: draws from the HTTP API once, then follows the live event stream
// (GET /api/v1/events, Server-Sent Events read with fetch so the token travels in the
// Authorization header, never in a URL) and redraws when events arrive: no polling. A
// progress event moves the task's bar at once; other events redraw (at most every
// REDRAW_MS). #task/<queue>/<id> shows one task: history, steps, progress, result, error.
// No framework, no build step. Every value from the API is inserted as text, never as HTML.
"use strict";

const REDRAW_MS = 250;
const RECONNECT_MS = 1000;
const TOKEN_KEY = "conveyor.token";
const MAX_QUEUES = 10;        // queues whose task lists are fetched on each refresh
const PER_STATUS = 8;         // records fetched per queue and status
const RECENT_ROWS = 15;
const FAILED_ROWS = 10;
const HISTORY = 90;           // throughput samples kept for the sparkline (3 minutes)
const STATUSES = ["pending", "scheduled", "processing", "success", "failed", "canceled", "timeout"];
const RECENT_STATUSES = ["processing", "pending", "scheduled", "success", "canceled", "timeout"];

const $ = (id) => document.getElementById(id);
const history = [];
let timer = null;
let stream = null;        // the AbortController of the open event stream
let lastEventId = null;   // resume point: the id of the last event read
let retryMs = RECONNECT_MS;  // doubles while the stream cannot reconnect, up to 30 s

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized();
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ")
      : body.detail;
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "className") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function fill(tableId, rows, emptyText, columns) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...(rows.length ? rows : [
    el("tr", {}, el("td", { className: "empty", colspan: String(columns), text: emptyText })),
  ]));
}

function ago(value) {
  if (value === null || value === undefined) return "–";
  const epoch = typeof value === "number" ? value : Date.parse(value) / 1000;
  const seconds = Math.max(0, Date.now() / 1000 - epoch);
  if (seconds < 60) return `${Math.floor(seconds)}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? `${Math.round(seconds * 1000)}ms` : `${seconds.toFixed(2)}s`;
}

function badge(status) {
  return el("span", { className: `badge ${status}`, text: status });
}

// A record or heartbeat the server could not fully read: shown, marked, with the reasons.
function damaged(item) {
  const damage = item.damage || [];
  return damage.length
    ? el("span", { className: "badge damaged", title: damage.join("\n"), text: "damaged" })
    : null;
}

function taskHref(queue, id) {
  return `#task/${encodeURIComponent(queue)}/${encodeURIComponent(id)}`;
}

function taskCell(task) {
  return el("td", { className: "task", title: task.id },
    el("a", { className: "task-link", href: taskHref(task.queue, task.id) },
      el("code", { text: task.id })));
}

function miniBar(progress) {
  const bar = el("div", { className: "bar" });
  bar.style.width = `${Math.round((progress || 0) * 100)}%`;
  return el("span", { className: "mini" }, bar);
}

function updatedOf(task) {
  return task.updated_at || task.finished_at || task.started_at || task.created_at;
}

async function act(button, path, verb) {
  button.disabled = true;
  try {
    await api(path, { method: verb });
    await refresh();
  } catch (error) {
    if (error instanceof Unauthorized) return askToken();
    showState(`${button.textContent} failed: ${error.message}`, "bad");
    button.disabled = false;
  }
}

// "." and ".." are path segments to a browser (also as %2E): no URL can name such a task, so
// no button that would act on another resource. Conveyor refuses these ids at push; only a
// record written by hand can have one.
const UNADDRESSABLE = [".", ".."];

function actionButton(task) {
  if (UNADDRESSABLE.includes(task.id)) {
    return el("span", { className: "muted small", text: "id not addressable" });
  }
  // encodeURIComponent encodes "/" too: the id stays one path segment, "/.." included.
  const path = `/api/v1/tasks/${encodeURIComponent(task.id)}`;
  const query = `?queue=${encodeURIComponent(task.queue)}`;
  if (["pending", "scheduled", "processing"].includes(task.status) && !task.cancel_requested) {
    const button = el("button", { className: "small cancel", "data-task-id": task.id, text: "Cancel" });
    button.addEventListener("click", () => act(button, path + query, "DELETE"));
    return button;
  }
  if (["failed", "timeout", "canceled"].includes(task.status)) {
    const button = el("button", { className: "small retry", "data-task-id": task.id, text: "Retry" });
    button.addEventListener("click", () => act(button, `${path}/retry${query}`, "POST"));
    return button;
  }
  return task.cancel_requested ? el("span", { className: "muted small", text: "canceling" }) : null;
}

function drawCards(stats, workers) {
  for (const status of ["pending", "scheduled", "processing", "failed"]) {
    $(`c-${status}`).textContent = stats.totals.counts[status] ?? 0;
  }
  $("c-workers").textContent = workers.length;
  $("c-done").textContent = stats.totals.done_last_minute;
  $("c-failed-min").textContent = stats.totals.failed_last_minute;
  history.push([stats.totals.done_last_minute, stats.totals.failed_last_minute]);
  if (history.length > HISTORY) history.shift();
  const top = Math.max(1, ...history.flat());
  // Samples fill the width as they arrive; one sample draws a level line.
  const samples = history.length > 1 ? history : [history[0], history[0]];
  const line = (index) => samples
    .map((sample, i) => `${(i / (samples.length - 1)) * 200},${38 - (sample[index] / top) * 34}`)
    .join(" ");
  const svg = "http://www.w3.org/2000/svg";
  const done = document.createElementNS(svg, "polyline");
  done.setAttribute("points", line(0));
  done.setAttribute("class", "spark-done");
  const failed = document.createElementNS(svg, "polyline");
  failed.setAttribute("points", line(1));
  failed.setAttribute("class", "spark-failed");
  $("spark").replaceChildren(done, failed);
}

function drawQueues(stats) {
  const rows = stats.queues.map((queue) => el("tr", {},
    el("td", {}, el("strong", { text: queue.queue })),
    ...STATUSES.map((status) => el("td", {
      className: `num${queue.counts[status] ? ` has-${status}` : ""}`,
      text: queue.counts[status] ?? 0,
    })),
    el("td", { className: "num", text: queue.done_last_minute }),
    el("td", { className: "num", text: duration(queue.mean_run_seconds) }),
    el("td", { className: "waiting", text: waitingText(queue.waiting) }),
    el("td", { className: "num", text: queue.preemptions ?? 0 }),
  ));
  fill("queues", rows, "no queues yet: push a task", 12);
}

// "p10: 2 · 1.2s  p0: 40 · 5m" — each priority's ready tasks and its longest wait.
function waitingText(bands) {
  if (!bands || !bands.length) return "—";
  return bands
    .map((band) => `p${band.priority}: ${band.count} · ${duration(band.oldest_seconds)}`)
    .join("  ");
}

function drawWorkers(workers) {
  const rows = workers.map((worker) => el("tr", {},
    el("td", {}, el("code", { text: worker.id })),
    el("td", { text: `${worker.host ?? "?"} / ${worker.pid ?? "?"}` }),
    el("td", { text: (worker.queues || []).join(", ") }),
    el("td", {}, badge(worker.state || "unknown"), damaged(worker)),
    el("td", { className: "current" }, ...(worker.current || []).map((task) => el("div", {},
      el("code", { text: task.task_id }),
      task.step ? el("span", { className: "muted", text: ` · ${task.step}` }) : null,
    ))),
    el("td", { className: "num", text: worker.processed ?? 0 }),
    el("td", { className: "num", text: worker.failed ?? 0 }),
    el("td", { className: "when", text: ago(worker.last_seen) }),
  ));
  fill("workers", rows, "no live workers: start one with `conveyor worker`", 8);
}

function inTime(epoch) {
  if (epoch === null || epoch === undefined) return "–";
  const seconds = epoch - Date.now() / 1000;
  if (seconds <= 0) return "now";
  if (seconds < 60) return `in ${Math.ceil(seconds)}s`;
  if (seconds < 3600) return `in ${Math.ceil(seconds / 60)}m`;
  if (seconds < 86400) return `in ${Math.ceil(seconds / 3600)}h`;
  return `in ${Math.ceil(seconds / 86400)}d`;
}

function drawSchedules(schedules) {
  const rows = schedules.map((schedule) => el("tr", {},
    el("td", {}, el("code", { text: schedule.name }),
      schedule.conflict.length ? badge("conflict") : null),
    el("td", {}, el("code", { text: `${schedule.cron ?? "?"} (${schedule.tz ?? "?"})` })),
    el("td", { text: schedule.queue ?? "?" }),
    el("td", { className: "when", text: inTime(schedule.next_run) }),
    el("td", { className: "when", text: ago(schedule.last_run) }),
    el("td", {}, schedule.last_status ? badge(schedule.last_status) : "–"),
    el("td", { text: (schedule.writers || []).join(", ") }),
  ));
  fill("schedules", rows, "no schedules: declare them in config (schedules:) or with pipeline.schedule()", 7);
}

async function fetchTasks(stats) {
  const queues = stats.queues.slice(0, MAX_QUEUES);
  const wanted = [];
  for (const queue of queues) {
    for (const status of [...RECENT_STATUSES, "failed"]) {
      if (queue.counts[status]) wanted.push([queue.queue, status]);
    }
  }
  const pages = await Promise.all(wanted.map(([queue, status]) => api(
    `/api/v1/tasks?queue=${encodeURIComponent(queue)}&status=${status}&limit=${PER_STATUS}`,
  )));
  const tasks = pages.flatMap((page) => page.tasks);
  const byTime = (a, b) => Date.parse(updatedOf(b)) - Date.parse(updatedOf(a));
  return {
    recent: tasks.filter((t) => t.status !== "failed").sort(byTime).slice(0, RECENT_ROWS),
    failed: tasks.filter((t) => t.status === "failed").sort(byTime).slice(0, FAILED_ROWS),
  };
}

function drawTasks({ recent, failed }) {
  fill("recent", recent.map((task) => el("tr", { "data-task-id": task.id },
    taskCell(task),
    el("td", { text: task.queue }),
    el("td", { text: task.type ?? "–" }),
    el("td", { className: "num", text: task.priority }),
    el("td", {}, badge(task.status), damaged(task), task.status === "processing"
      ? el("span", { className: "live-progress" }, miniBar(task.progress),
        el("span", { className: "muted small pct", text: ` ${Math.round((task.progress || 0) * 100)}%` }))
      : null),
    el("td", { className: "when", text: ago(updatedOf(task)) }),
    el("td", { className: "actions" }, actionButton(task)),
  )), "no tasks", 7);
  fill("failed", failed.map((task) => el("tr", { "data-task-id": task.id },
    taskCell(task),
    el("td", { text: task.queue }),
    el("td", { className: "error", title: task.error?.traceback ?? "" },
      el("strong", { text: task.error ? `${task.error.type}: ` : "" }),
      task.error ? task.error.message : (task.dead_reason ?? "")),
    el("td", { className: "when", text: ago(task.finished_at || updatedOf(task)) }),
    el("td", { className: "actions" }, actionButton(task)),
  )), "no failed tasks", 5);
}

function showState(text, kind) {
  const state = $("state");
  state.textContent = text;
  state.className = `pill ${kind || ""}`;
}

async function refresh() {
  if (currentTask()) await drawTaskPage();
  const [stats, workers, schedules] = await Promise.all([
    api("/api/v1/stats"), api("/api/v1/workers"), api("/api/v1/schedules"),
  ]);
  $("backend").textContent = stats.backend;
  drawCards(stats, workers.workers);
  drawQueues(stats);
  drawWorkers(workers.workers);
  drawSchedules(schedules.schedules);
  drawTasks(await fetchTasks(stats));
  $("signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
  showState(`live · ${new Date().toLocaleTimeString()}`, "ok");
}

// A redraw soon (coalescing a burst of events into one), never a periodic one.
function redrawSoon() {
  if (timer !== null) return;
  timer = setTimeout(async () => {
    timer = null;
    try {
      await refresh();
    } catch (error) {
      if (error instanceof Unauthorized) return askToken();
      showState(`error: ${error.message}`, "bad");
    }
  }, REDRAW_MS);
}

// A progress event moves the bars at once, without a round trip.
function showProgress(event) {
  const percent = `${Math.round(event.progress * 100)}%`;
  const row = document.querySelector(`#recent tr[data-task-id="${CSS.escape(event.task_id)}"]`);
  if (row) {
    const bar = row.querySelector(".mini .bar");
    if (bar) bar.style.width = percent;
    const text = row.querySelector(".pct");
    if (text) text.textContent = ` ${percent}`;
  }
  const shown = currentTask();
  if (shown && shown.queue === event.queue && shown.id === event.task_id) {
    $("t-bar").style.width = percent;
    $("t-progress").textContent = percent;
    $("t-note").textContent = event.note || "";
  }
}

function onEvent(kind, data) {
  if (kind === "reset") return redrawSoon();  // events were trimmed: read the state again
  const event = JSON.parse(data);
  if (event.event === "progress") showProgress(event);
  else redrawSoon();
}

// Server-Sent Events over fetch: "id:", "event:", "data:" lines, a blank line ends one.
async function follow() {
  if (stream) stream.abort();
  const controller = new AbortController();
  stream = controller;
  const headers = { Accept: "text/event-stream" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  try {
    const response = await fetch("/api/v1/events", { headers, signal: controller.signal });
    if (response.status === 401) return askToken();
    if (!response.ok || !response.body) throw new Error(`events: HTTP ${response.status}`);
    showState("live", "ok");
    if (retryMs > RECONNECT_MS) redrawSoon();  // back after an outage: read the state again
    retryMs = RECONNECT_MS;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "id") lastEventId = text;
          else if (field === "event") kind = text;
          else if (field === "data") data.push(text);
        }
        if (data.length) onEvent(kind, data.join("\n"));
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
    showState(`reconnecting: ${error.message}`, "bad");
  }
  if (stream === controller) {
    setTimeout(() => { if (stream === controller) follow(); }, retryMs);
    retryMs = Math.min(retryMs * 2, 30000);
  }
}

async function start() {
  try {
    await refresh();
  } catch (error) {
    if (error instanceof Unauthorized) return askToken();
    showState(`error: ${error.message}`, "bad");
  }
  follow();
}

// -- the task page (#task/<queue>/<id>) --------------------------------------------------------

function currentTask() {
  const match = /^#task\/([^/]*)\/(.*)$/.exec(location.hash);
  return match ? { queue: decodeURIComponent(match[1]), id: decodeURIComponent(match[2]) } : null;
}

function json(value) {
  return value === null || value === undefined ? "–" : JSON.stringify(value, null, 2);
}

async function drawTaskPage() {
  const shown = currentTask();
  $("task-page").hidden = !shown;
  $("overview").hidden = Boolean(shown);
  if (!shown) return;
  const task = await api(`/api/v1/tasks/${encodeURIComponent(shown.id)}?queue=${encodeURIComponent(shown.queue)}`);
  $("t-id").textContent = task.id;
  $("t-queue").textContent = task.queue;
  $("t-status").replaceChildren(badge(task.status), damaged(task) || "");
  const percent = `${Math.round((task.progress || 0) * 100)}%`;
  $("t-bar").style.width = percent;
  $("t-progress").textContent = percent;
  $("t-note").textContent = task.progress_message || "";
  $("t-attempts").textContent = task.max_retries === null || task.max_retries === undefined
    ? task.attempts : `${task.attempts} (max retries ${task.max_retries})`;
  $("t-worker").textContent = task.worker || "–";
  $("t-type").textContent = task.type ?? "–";
  $("t-priority").textContent = task.priority;
  $("t-created").textContent = ago(task.created_at);
  $("t-finished").textContent = ago(task.finished_at);
  $("t-result").textContent = json(task.result);
  $("t-error-box").hidden = !task.error;
  $("t-error").textContent = task.error ? `${task.error.type}: ${task.error.message}` : "";
  $("t-traceback").textContent = task.error?.traceback || "";
  fill("t-steps", Object.entries(task.steps || {}).map(([name, result]) => el("tr", {},
    el("td", {}, el("code", { text: name })),
    el("td", {}, el("pre", { className: "json", text: json(result) })),
  )), "no step finished yet", 2);
  fill("t-history", (task.history || []).map((line) => el("tr", {},
    el("td", { className: "when", text: new Date(line.at).toLocaleTimeString() }),
    el("td", {}, badge(line.event)),
    el("td", { className: "num", text: line.attempt }),
    el("td", { text: line.note ?? "" }),
  )), "no history", 4);
}

async function route() {
  try {
    if (currentTask()) await drawTaskPage();
    else {
      $("task-page").hidden = true;
      $("overview").hidden = false;
    }
  } catch (error) {
    if (error instanceof Unauthorized) return askToken();
    showState(`error: ${error.message}`, "bad");
  }
}

function askToken(message) {
  clearTimeout(timer);
  timer = null;
  if (stream) stream.abort();
  stream = null;
  showState("token needed", "bad");
  $("login-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : (message || "");
  $("login").hidden = false;
  $("token").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("login").hidden = true;
    start();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askToken();
  });
  window.addEventListener("hashchange", route);
  $("task-back").addEventListener("click", (event) => {
    event.preventDefault();
    location.hash = "";
  });
  start();
});
