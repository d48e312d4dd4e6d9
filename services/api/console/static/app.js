// The Tunery console: a small single-page app on the public REST API (see api.js). Pages are routed by
// the URL's hash (#/jobs, #/jobs/<id>, #/files, #/files/<id>, #/new, #/models, #/signin).
import * as api from "./api.js";
import { LossChart } from "./chart.js";
import {
  asConversation,
  firstExamples,
  formatBytes,
  formatCost,
  formatDuration,
  formatNumber,
  formatTime,
  parseProblems,
} from "./data.js";

// -- DOM helpers ------------------------------------------------------------------------------------

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value == null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "value" || name === "checked") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const TASK_OF_METHOD = { supervised: "chat", dpo: "preference", classification: "classification" };

function stageBadge(stage) {
  return h("span", { class: `badge badge-${stage}` }, stage.replaceAll("_", " "));
}

function errorBox(error) {
  const text = error instanceof Error ? error.message : String(error);
  return h("p", { class: "notice notice-error", role: "alert" }, text);
}

function tableWrap(table) {
  // Wide tables scroll sideways on narrow screens instead of widening the page.
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": table.caption?.textContent || "table" }, table);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

const announcer = () => document.getElementById("announcer");
function announce(text) {
  announcer().textContent = text;
}

// -- routing ----------------------------------------------------------------------------------------

const view = () => document.getElementById("view");
let current = null; // the AbortController of the page on screen: aborting it stops its streams and polls

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = hash.split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query);
  if (!api.apiKey() && parts[0] !== "signin") {
    location.replace("#/signin");
    return;
  }
  current?.abort();
  current = new AbortController();
  const signal = current.signal;
  document.body.classList.toggle("signed-in", Boolean(api.apiKey()));
  const pages = {
    signin: () => signInPage(signal),
    jobs: () => (parts[1] ? jobPage(decodeURIComponent(parts[1]), signal) : jobsPage(signal)),
    files: () => (parts[1] ? filePage(decodeURIComponent(parts[1]), signal) : filesPage(signal)),
    new: () => newJobPage(params, signal),
    models: () => modelsPage(signal),
  };
  const page = pages[parts[0]] || pages.jobs;
  for (const link of document.querySelectorAll("#nav a")) {
    const active = link.getAttribute("href") === `#/${parts[0] || "jobs"}`;
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  replace(view());
  Promise.resolve(page()).catch((error) => {
    if (!signal.aborted) append(view(), errorBox(error));
  });
}

function heading(text, ...extra) {
  // Focus moves to each new page's heading, so keyboard and screen-reader users land on it.
  const h1 = h("h1", { tabindex: "-1" }, text);
  document.title = `${text} · Tunery`;
  const header = h("div", { class: "page-header" }, h1, ...extra);
  append(view(), header);
  h1.focus({ preventScroll: true });
  return header;
}

// -- sign in ----------------------------------------------------------------------------------------

let signInReason = "";

function signInPage() {
  document.body.classList.remove("signed-in");
  heading("Sign in");
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "api-key-hint",
  });
  const message = h("div", { id: "signin-message", role: "alert" });
  if (signInReason) message.append(h("p", { class: "notice notice-error" }, signInReason));
  signInReason = "";
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    { class: "card narrow", novalidate: true },
    h("label", { for: "api-key" }, "API key"),
    input,
    h(
      "p",
      { id: "api-key-hint", class: "hint" },
      "A key such as tun_…: ",
      h("code", {}, "tunery up"),
      " saved one in ",
      h("code", {}, ".tunery/api-key"),
      "; ",
      h("code", {}, "tunery keys create"),
      " makes more. The key stays in this browser tab only and is sent only in the Authorization header.",
    ),
    message,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    replace(message);
    if (!key) {
      append(message, h("p", { class: "notice notice-error" }, "Enter an API key."));
      input.focus();
      return;
    }
    button.disabled = true;
    try {
      await api.get("/v1/fine_tuning/jobs?limit=1", { key });
      api.signIn(key);
      location.hash = "#/jobs";
    } catch (error) {
      const text =
        error.status === 401
          ? `This API key was not accepted (401: ${error.message}). Check that you pasted the whole key.`
          : `Could not sign in: ${error.message}`;
      append(message, h("p", { class: "notice notice-error" }, text));
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  append(view(), form);
}

// -- jobs -------------------------------------------------------------------------------------------

function progressCell(job) {
  const p = job.progress || {};
  if (!p.total_steps) return h("span", { class: "muted" }, job.stage === "succeeded" ? "done" : "—");
  const pct = Math.round((100 * p.step) / p.total_steps);
  return h(
    "span",
    { class: "progress-cell" },
    h("progress", { max: String(p.total_steps), value: p.step, "aria-label": `${job.id} progress` }),
    ` ${p.step}/${p.total_steps} (${pct}%)`,
  );
}

async function jobsPage(signal) {
  heading("Jobs", h("a", { href: "#/new", class: "button primary" }, "New job"));
  const usage = h("section", { class: "glance", "aria-label": "At a glance" });
  const holder = h("div");
  append(view(), usage, holder);
  let first = true;
  while (!signal.aborted) {
    const [jobs, files, spent] = await Promise.all([
      api.get("/v1/fine_tuning/jobs?limit=50", { signal }),
      first ? api.get("/v1/files?limit=1000", { signal }) : null,
      api.get("/v1/usage", { signal }),
    ]);
    if (signal.aborted) return;
    const active = jobs.data.filter((j) => !TERMINAL.has(j.stage)).length;
    const glance = [
      ["Jobs", `${jobs.data.length}${jobs.has_more ? "+" : ""}`],
      ["Active", String(active)],
      ["Spent", formatCost(spent.cost_usd)],
      ["Device time", formatDuration(spent.device_seconds)],
    ];
    if (files) glance.splice(2, 0, ["Files", String(files.data.length)]);
    else glance.splice(2, 0, ["Files", usage.dataset.files || "—"]);
    if (files) usage.dataset.files = String(files.data.length);
    replace(
      usage,
      glance.map(([label, value]) => h("div", { class: "stat" }, h("span", { class: "stat-label" }, label), h("span", { class: "stat-value" }, value))),
    );
    if (!jobs.data.length) {
      replace(holder, h("p", { class: "empty" }, "No jobs yet. ", h("a", { href: "#/files" }, "Upload a dataset"), ", then create a job."));
    } else {
      const rows = jobs.data.map((job) =>
        h(
          "tr",
          {},
          h("th", { scope: "row", "data-label": "Job" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
          h("td", { "data-label": "Model" }, job.model),
          h("td", { "data-label": "Status" }, stageBadge(job.stage)),
          h("td", { "data-label": "Progress" }, progressCell(job)),
          h("td", { "data-label": "Created" }, formatTime(job.created_at)),
        ),
      );
      replace(
        holder,
        tableWrap(
          h(
            "table",
            { id: "jobs-table", class: "stack" },
            h("caption", { class: "visually-hidden" }, "Fine-tuning jobs, newest first"),
            h("thead", {}, h("tr", {}, ["Job", "Model", "Status", "Progress", "Created"].map((t) => h("th", { scope: "col" }, t)))),
            h("tbody", {}, rows),
          ),
        ),
      );
    }
    first = false;
    await sleep(active ? 2000 : 8000, signal);
  }
}

async function jobPage(jobId, signal) {
  let job = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`, { signal });
  const header = heading(`Job ${job.id}`);
  const status = h("p", { class: "job-status", id: "job-status" });
  const controls = h("div", { class: "controls", role: "group", "aria-label": "Job controls" });
  const feedback = h("div", { role: "status", class: "feedback" });
  const stats = h("dl", { class: "stats", id: "job-stats" });
  const outcome = h("div", { id: "job-outcome" });
  const figure = h(
    "figure",
    { class: "chart card", id: "loss-chart", dataset: { points: "0" } },
    h("figcaption", {}, h("strong", {}, "Loss"), " ", h("span", { class: "chart-summary", "aria-live": "polite" })),
    h("div", { class: "chart-canvas", "aria-hidden": "true" }),
  );
  const log = h("ol", { class: "events", id: "events-log" });
  append(header, status);
  append(
    view(),
    controls,
    feedback,
    stats,
    outcome,
    figure,
    h(
      "section",
      { class: "card", "aria-labelledby": "events-heading" },
      h("h2", { id: "events-heading" }, "Events"),
      // A scrolling region: focusable, so keyboard users can scroll it; a log, newest first.
      h("div", { class: "events-scroll", role: "log", tabindex: "0", "aria-label": "Job events, newest first" }, log),
    ),
  );
  const chart = new LossChart(figure);
  signal.addEventListener("abort", () => chart.destroy());

  const act = async (verb) => {
    replace(feedback);
    try {
      job = await api.post(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/${verb}`, undefined, { signal });
      render();
      announce(`Job ${verb} requested; the job is now ${job.stage}.`);
    } catch (error) {
      append(feedback, errorBox(error));
    }
  };

  function renderControls() {
    const stage = job.stage;
    const cancelling = controls.dataset.confirm === "1";
    replace(
      controls,
      h("button", { type: "button", onclick: () => act("pause"), disabled: !["queued", "running"].includes(stage) }, "Pause"),
      h("button", { type: "button", onclick: () => act("resume"), disabled: stage !== "paused" }, "Resume"),
      cancelling
        ? [
            h("span", { class: "confirm-text" }, "Cancel this job? Nothing it trained is kept."),
            h("button", { type: "button", class: "danger", onclick: () => { controls.dataset.confirm = ""; act("cancel"); } }, "Yes, cancel the job"),
            h("button", { type: "button", onclick: () => { controls.dataset.confirm = ""; renderControls(); } }, "Keep it"),
          ]
        : h(
            "button",
            {
              type: "button",
              class: "danger",
              disabled: TERMINAL.has(stage),
              onclick: () => {
                controls.dataset.confirm = "1";
                renderControls();
                controls.querySelector(".danger").focus();
              },
            },
            "Cancel",
          ),
    );
  }

  function render() {
    replace(status, stageBadge(job.stage), ` ${job.model} · created ${formatTime(job.created_at)}`);
    status.dataset.stage = job.stage;
    renderControls();
    const p = job.progress || {};
    const remaining = job.estimated_finish && job.stage === "running" ? job.estimated_finish - Date.now() / 1000 : null;
    const estimate = job.estimate?.gpu_classes?.[job.gpu_class];
    const items = [
      ["Step", p.total_steps ? `${p.step} of ${p.total_steps}` : "—"],
      ["Epoch", p.epoch ? p.epoch.toFixed(2) : "—"],
      ["Training loss", p.train_loss != null ? p.train_loss.toFixed(4) : "—"],
      ["Tokens/s", p.tokens_per_second != null ? formatNumber(Math.round(p.tokens_per_second)) : "—"],
      ["Time left", remaining != null ? formatDuration(remaining) : "—"],
      ["Cost so far", formatCost(job.usage?.cost_usd)],
      ["Estimated cost", estimate ? `${formatCost(estimate.cost_usd)} (${formatDuration(estimate.duration_seconds)})` : "—"],
      ["GPU class", job.gpu_class],
    ];
    replace(stats, items.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    const parts = [];
    if (job.error) parts.push(h("p", { class: "notice notice-error", role: "alert" }, `${job.error.code || "error"}: ${job.error.message}`));
    if (job.fine_tuned_model) {
      parts.push(h("p", { class: "notice notice-ok" }, "Fine-tuned model: ", h("code", {}, job.fine_tuned_model)));
    }
    const ev = job.evaluation;
    if (ev?.base && ev?.fine_tuned) {
      parts.push(
        h(
          "p",
          {},
          `Evaluation on ${ev.validation_source?.replaceAll("_", " ") || "validation data"}: loss `,
          h("strong", {}, Number(ev.base.loss).toFixed(4)),
          " (base) → ",
          h("strong", {}, Number(ev.fine_tuned.loss).toFixed(4)),
          " (tuned)",
        ),
      );
    }
    if (job.stage === "succeeded") {
      parts.push(h("button", { type: "button", id: "download-artifacts", onclick: downloadArtifacts }, "Download artifacts (.tar)"));
    }
    replace(outcome, parts);
  }

  async function downloadArtifacts() {
    replace(feedback, h("p", {}, "Preparing the download…"));
    try {
      const response = await api.download(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/artifacts/archive`);
      const url = URL.createObjectURL(await response.blob());
      const link = h("a", { href: url, download: `${job.id}.tar` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      replace(feedback, h("p", {}, `Downloaded ${job.id}.tar.`));
    } catch (error) {
      replace(feedback, errorBox(error));
    }
  }

  let refreshing = null;
  const refresh = () => {
    refreshing ??= (async () => {
      await sleep(500, signal);
      try {
        if (!signal.aborted) job = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}`, { signal });
        if (!signal.aborted) render();
      } catch (error) {
        if (!signal.aborted) replace(feedback, errorBox(error));
      } finally {
        refreshing = null;
      }
    })();
  };

  const loadSeries = async () => {
    const series = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/metrics?max_points=2000`, { signal });
    if (!signal.aborted) chart.setRows(series.data);
  };

  render();
  await loadSeries();
  const entries = [];
  const onEvent = (event) => {
    entries.push(event);
    log.prepend(
      h(
        "li",
        { class: `event event-${event.level}` },
        h("time", { datetime: new Date(event.created_at * 1000).toISOString() }, new Date(event.created_at * 1000).toLocaleTimeString()),
        " ",
        event.message,
      ),
    );
    while (log.children.length > 500) log.lastElementChild.remove();
    if (event.type === "metrics" && event.data) chart.addTrain(event.data.step, event.data.train_loss);
    else if (event.data && typeof event.data.loss === "number" && /^Epoch \d+ complete/.test(event.message)) chart.addValidation(event.data.loss);
    refresh();
  };
  try {
    await api.followEvents(job.id, {
      signal,
      onEvent,
      onEnd: async () => {
        job = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}`, { signal });
        render();
        await loadSeries();
        announce(`Job ${job.id} ${job.stage}.`);
      },
    });
  } catch (error) {
    if (!signal.aborted) replace(feedback, errorBox(error));
  }
}

// -- files ------------------------------------------------------------------------------------------

async function filesPage(signal) {
  heading("Files");
  const input = h("input", { id: "upload-input", type: "file", class: "visually-hidden", accept: ".jsonl,.json,.csv,.parquet,.gz" });
  const progress = h("progress", { id: "upload-progress", max: "1", value: 0, hidden: true, "aria-label": "Upload progress" });
  const progressText = h("span", { class: "upload-status", role: "status" });
  const zone = h(
    "div",
    { class: "dropzone", id: "dropzone" },
    input,
    h("label", { for: "upload-input" }, h("span", { class: "button primary" }, "Choose a file"), h("span", { class: "drop-hint" }, " or drop it here")),
    h("p", { class: "hint" }, "JSONL, JSON, CSV or Parquet (or gzip-compressed): chat, prompt/completion, Alpaca, ShareGPT, preference pairs or text/label rows. Every line is checked as it uploads."),
    h("div", { class: "upload-progress" }, progress, progressText),
  );
  const result = h("section", { id: "upload-result", "aria-live": "polite" });
  const list = h("section", { "aria-labelledby": "files-heading" }, h("h2", { id: "files-heading" }, "Your files"));
  append(view(), zone, result, list);

  const upload = async (file) => {
    if (!file) return;
    replace(result);
    progress.hidden = false;
    progress.value = 0;
    progressText.textContent = ` Uploading ${file.name}…`;
    try {
      const stored = await api.uploadFile(file, {
        onProgress: (share) => {
          progress.value = share;
          progressText.textContent = ` Uploading ${file.name}: ${Math.round(share * 100)}%`;
        },
      });
      progress.value = 1;
      progressText.textContent = ` ${file.name} uploaded and checked.`;
      await showFile(result, stored, signal);
      await renderList();
    } catch (error) {
      progress.hidden = true;
      progressText.textContent = "";
      append(result, errorBox(error));
    } finally {
      input.value = "";
    }
  };
  input.addEventListener("change", () => upload(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    upload(event.dataTransfer.files[0]);
  });

  const table = h("div");
  append(list, table);
  async function renderList() {
    const files = await api.get("/v1/files?limit=200", { signal });
    if (!files.data.length) {
      replace(table, h("p", { class: "empty" }, "No files yet."));
      return;
    }
    replace(
      table,
      tableWrap(
        h(
          "table",
          { id: "files-table", class: "stack" },
          h("caption", { class: "visually-hidden" }, "Uploaded files, newest first"),
          h("thead", {}, h("tr", {}, ["File", "Name", "Status", "Examples", "Size", "Uploaded"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            files.data.map((f) =>
              h(
                "tr",
                {},
                h("th", { scope: "row", "data-label": "File" }, h("a", { href: `#/files/${encodeURIComponent(f.id)}` }, f.id)),
                h("td", { "data-label": "Name" }, f.filename),
                h("td", { "data-label": "Status" }, h("span", { class: `badge badge-${f.status}` }, f.status)),
                h("td", { class: "num", "data-label": "Examples" }, formatNumber(f.n_examples)),
                h("td", { class: "num", "data-label": "Size" }, formatBytes(f.bytes)),
                h("td", { "data-label": "Uploaded" }, formatTime(f.created_at)),
              ),
            ),
          ),
        ),
      ),
    );
  }
  await renderList();
}

async function filePage(fileId, signal) {
  const file = await api.get(`/v1/files/${encodeURIComponent(fileId)}`, { signal });
  heading(file.filename, h("a", { href: "#/files", class: "button" }, "All files"));
  const holder = h("section");
  append(view(), holder);
  await showFile(holder, file, signal, { title: false });
}

// A file just uploaded or opened: its problems as a table, or its summary, preview and report.
async function showFile(holder, file, signal, { title = true } = {}) {
  if (file.status === "error") {
    const { problems, more, total } = parseProblems(file.status_details);
    append(
      holder,
      title ? h("h2", {}, `${file.filename} was not accepted`) : null,
      h(
        "p",
        { class: "notice notice-error", role: "alert" },
        `${total} ${total === 1 ? "problem" : "problems"} found in ${file.filename}. No job accepts this file: fix the lines below and upload it again.`,
      ),
      tableWrap(
        h(
          "table",
          { id: "problems-table", class: "problems" },
          h("caption", {}, `Problems in ${file.filename}`),
          h("thead", {}, h("tr", {}, ["Line", "Field", "Reason"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            problems.map((p) =>
              h(
                "tr",
                {},
                h("td", { class: "num" }, p.line != null ? (p.place === "line" ? String(p.line) : `${p.place} ${p.line}`) : "whole file"),
                h("td", {}, p.field ? h("code", {}, p.field) : "—"),
                h("td", {}, p.reason),
              ),
            ),
          ),
        ),
      ),
      more ? h("p", { class: "hint" }, `…and ${more} more (the first ${problems.length} are shown).`) : null,
    );
    return;
  }
  append(
    holder,
    title ? h("h2", {}, `${file.filename} is ready`) : null,
    h(
      "dl",
      { class: "stats" },
      [
        ["Examples", formatNumber(file.n_examples)],
        ["Format", `${file.format} (${file.container})`],
        ["Task", file.task],
        ["Size", formatBytes(file.bytes)],
        ["File id", file.id],
      ].map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
    ),
    h("p", {}, h("a", { href: `#/new?file=${encodeURIComponent(file.id)}`, class: "button primary" }, "Fine-tune on this file")),
  );
  append(holder, reportSection(file));
  const preview = h("section", { class: "card", id: "preview", "aria-labelledby": "preview-heading" }, h("h2", { id: "preview-heading" }, "First examples"));
  append(holder, preview);
  try {
    const response = await api.download(`/v1/files/${encodeURIComponent(file.id)}/content`, { signal });
    const rows = await firstExamples(response, file.container, 3);
    if (!rows) {
      append(preview, h("p", { class: "hint" }, `The preview reads JSONL and JSON files; this one is ${file.container}.`));
      return;
    }
    rows.forEach((row, i) => append(preview, conversation(row, i + 1)));
  } catch (error) {
    if (!signal.aborted) append(preview, errorBox(error));
  }
}

function conversation(row, number) {
  const { turns, rejected, label } = asConversation(row);
  return h(
    "article",
    { class: "conversation", "aria-label": `Example ${number}` },
    h("h3", {}, `Example ${number}`),
    turns.map((t) => h("div", { class: `turn turn-${t.role.split(" ")[0].replace(/[^a-z]/gi, "")}` }, h("span", { class: "role" }, t.role), h("p", {}, t.content))),
    rejected ? h("div", { class: "turn turn-rejected" }, h("span", { class: "role" }, "rejected"), h("p", {}, rejected)) : null,
    label != null ? h("p", { class: "label" }, "Label: ", h("strong", {}, label)) : null,
  );
}

function bars(title, items, unit = "") {
  // A small bar chart in HTML: each bar's length is its share of the largest value.
  const max = Math.max(...items.map(([, v]) => v), 1);
  return h(
    "figure",
    { class: "bars" },
    h("figcaption", {}, title),
    h(
      "dl",
      {},
      items.map(([label, value]) =>
        h(
          "div",
          { class: "bar-row" },
          h("dt", {}, label),
          h("dd", {}, h("span", { class: "bar", style: `width: ${Math.max(2, (100 * value) / max)}%` }), h("span", { class: "bar-value" }, `${formatNumber(value)}${unit}`)),
        ),
      ),
    ),
  );
}

function reportSection(file) {
  const report = file.report || {};
  const stats = report.stats || {};
  const section = h("section", { class: "card report", id: "report", "aria-labelledby": "report-heading" }, h("h2", { id: "report-heading" }, "Report"));
  const charts = h("div", { class: "chart-row" });
  if (stats.characters) {
    charts.append(bars("Characters per example", [["median", stats.characters.p50], ["95th percentile", stats.characters.p95], ["longest", stats.characters.max]]));
  }
  if (report.suggested_split) {
    charts.append(bars(`Suggested split (${report.suggested_split.rule})`, [["training", report.suggested_split.train], ["validation", report.suggested_split.validation]], " examples"));
  }
  append(section, charts);
  const facts = [];
  if (stats.exact_duplicates != null) facts.push(["Exact duplicates", formatNumber(stats.exact_duplicates)]);
  if (stats.near_duplicates != null) facts.push(["Near duplicates", `${formatNumber(stats.near_duplicates)} (similarity ≥ ${stats.similarity_threshold})`]);
  if (stats.empty_turns != null) facts.push(["Empty turns", formatNumber(stats.empty_turns)]);
  const pii = report.personal_data?.counts || {};
  const kinds = Object.entries(pii);
  facts.push(["Personal data", kinds.length ? kinds.map(([k, n]) => `${k}: ${n}`).join(", ") : "none found"]);
  append(section, h("dl", { class: "stats" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))));
  return section;
}

// -- new job ----------------------------------------------------------------------------------------

function field(id, label, control, hint) {
  return h("div", { class: "field" }, h("label", { for: id }, label), control, hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null);
}

async function newJobPage(params, signal) {
  heading("New job");
  const [models, files] = await Promise.all([api.get("/v1/models", { signal }), api.get("/v1/files?limit=1000", { signal })]);
  const catalog = models.data.filter((m) => !m.fine_tuned);
  const usable = files.data.filter((f) => f.status === "processed" && f.purpose === "fine-tune");

  const model = h("select", { id: "model", name: "model", required: true, "aria-describedby": "model-hint" }, catalog.map((m) => h("option", { value: m.id }, m.id)));
  const modelHint = h("p", { class: "hint", id: "model-hint" });
  const method = h("select", { id: "method", name: "method" });
  const training = h("select", { id: "training-file", name: "training_file", required: true });
  const validation = h("select", { id: "validation-file", name: "validation_file", "aria-describedby": "validation-file-hint" });
  const auto = (id, label, hint, mode = "numeric") =>
    field(id, label, h("input", { id, name: id, type: "text", inputmode: mode, placeholder: "auto", autocomplete: "off", "aria-describedby": `${id}-hint` }), hint);
  const suffix = h("input", { id: "suffix", name: "suffix", type: "text", maxlength: "64", pattern: "[A-Za-z0-9_.\\-]+", autocomplete: "off", "aria-describedby": "suffix-hint" });
  const estimate = h("section", { class: "card estimate", id: "estimate", "aria-live": "polite", "aria-labelledby": "estimate-heading" }, h("h2", { id: "estimate-heading" }, "Settings and estimate"));
  const estimateBody = h("div", {}, h("p", { class: "hint" }, "Choose a training file to see the settings Tunery picks and what the job will cost."));
  estimate.append(estimateBody);
  const submitMessage = h("div", { role: "alert" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create job");

  const form = h(
    "form",
    { class: "card job-form", novalidate: true },
    h("div", { class: "field" }, h("label", { for: "model" }, "Model"), model, modelHint),
    field("method", "Method", method),
    field("training-file", "Training file", training),
    field("validation-file", "Validation file", validation, "Without one, Tunery holds out a split of the training file."),
    h(
      "fieldset",
      {},
      h("legend", {}, "Settings (leave empty for auto)"),
      h(
        "div",
        { class: "grid" },
        auto("n_epochs", "Epochs", "1–50"),
        auto("batch_size", "Batch size", "1–256"),
        auto("learning_rate_multiplier", "Learning-rate multiplier", "× the model's base rate, at most 10", "decimal"),
        auto("lora_r", "LoRA rank (r)", "default 8"),
      ),
    ),
    field("suffix", "Name suffix (optional)", suffix, "Letters, digits, . _ - ; added to the fine-tuned model's name."),
    submitMessage,
    submit,
  );
  if (!usable.length) {
    append(view(), h("p", { class: "notice" }, "No usable file yet: ", h("a", { href: "#/files" }, "upload a dataset"), " first."));
  }
  append(view(), h("div", { class: "two-columns" }, form, estimate));

  const fillMethods = () => {
    const entry = catalog.find((m) => m.id === model.value);
    const previous = method.value;
    replace(method, (entry?.tasks || ["supervised"]).map((t) => h("option", { value: t }, t)));
    if ([...method.options].some((o) => o.value === previous)) method.value = previous;
    replace(
      modelHint,
      entry ? [entry.description || "", entry.license ? ` Licence: ${entry.license}.` : "", entry.max_seq_length ? ` Context: ${formatNumber(entry.max_seq_length)} tokens.` : ""] : "",
    );
  };
  const fillFiles = () => {
    const task = TASK_OF_METHOD[method.value];
    const fitting = usable.filter((f) => f.task === task);
    const previous = training.value || params.get("file");
    const option = (f) => h("option", { value: f.id }, `${f.filename} · ${formatNumber(f.n_examples)} examples · ${f.id}`);
    replace(training, fitting.length ? fitting.map(option) : h("option", { value: "" }, `no ${task} files uploaded`));
    if (fitting.some((f) => f.id === previous)) training.value = previous;
    const previousValidation = validation.value;
    replace(validation, h("option", { value: "" }, "None: hold out a split"), fitting.map(option));
    if (fitting.some((f) => f.id === previousValidation)) validation.value = previousValidation;
  };
  fillMethods();
  fillFiles();

  const number = (id, parse) => {
    const raw = form.querySelector(`#${id}`).value.trim();
    if (!raw || raw === "auto") return "auto";
    const value = parse(raw);
    return Number.isFinite(value) ? value : raw; // the API names what is wrong with it
  };
  const body = () => {
    const hyperparameters = {
      n_epochs: number("n_epochs", Number),
      batch_size: number("batch_size", Number),
      learning_rate_multiplier: number("learning_rate_multiplier", Number),
    };
    const job = { model: model.value, training_file: training.value, method: { type: method.value, [method.value]: { hyperparameters } } };
    if (validation.value) job.validation_file = validation.value;
    const r = number("lora_r", Number);
    if (r !== "auto") job.lora = { r, alpha: typeof r === "number" ? 2 * r : r };
    if (suffix.value.trim()) job.suffix = suffix.value.trim();
    return job;
  };

  let pending = null;
  let timer = null;
  const runEstimate = async () => {
    pending?.abort();
    if (!training.value) return;
    const mine = new AbortController();
    pending = mine;
    signal.addEventListener("abort", () => mine.abort());
    estimate.setAttribute("aria-busy", "true");
    replace(estimateBody, h("p", { class: "hint" }, "Estimating… (an evaluator tokenizes the data with the model's tokenizer)"));
    try {
      const result = await api.post("/v1/fine_tuning/jobs/estimate", body(), { signal: mine.signal });
      if (!mine.signal.aborted) replace(estimateBody, estimateView(result));
    } catch (error) {
      if (!mine.signal.aborted) replace(estimateBody, errorBox(error));
    } finally {
      if (pending === mine) estimate.removeAttribute("aria-busy");
    }
  };
  const schedule = () => {
    clearTimeout(timer);
    timer = setTimeout(runEstimate, 400);
  };
  model.addEventListener("change", () => {
    fillMethods();
    fillFiles();
    schedule();
  });
  method.addEventListener("change", () => {
    fillFiles();
    schedule();
  });
  form.addEventListener("change", (event) => {
    if (event.target !== model && event.target !== method) schedule();
  });
  form.addEventListener("input", (event) => {
    if (event.target.tagName === "INPUT") schedule();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(submitMessage);
    if (!training.value) {
      append(submitMessage, h("p", { class: "notice notice-error" }, "Choose a training file."));
      training.focus();
      return;
    }
    submit.disabled = true;
    try {
      const job = await api.post("/v1/fine_tuning/jobs", body(), { signal });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      append(submitMessage, errorBox(error));
      const param = error.param && form.querySelector(`[name="${error.param.split(".").pop()}"]`);
      param?.focus();
    } finally {
      submit.disabled = false;
    }
  });
  if (training.value) runEstimate();
}

const SHOWN_SETTINGS = ["n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "max_seq_length", "method", "lora", "packing", "warmup_ratio", "scheduler"];

function estimateView(result) {
  const hp = result.hyperparameters || {};
  const reasons = hp.reasons || {};
  const e = result.estimate || {};
  const value = (name) => {
    if (name === "lora") return "adapter";
    const v = hp[name];
    return v == null ? "—" : typeof v === "number" ? formatNumber(v) : String(v);
  };
  const settings = SHOWN_SETTINGS.filter((name) => name in hp || name in reasons).map((name) =>
    h(
      "tr",
      {},
      h("th", { scope: "row", "data-label": "Setting" }, name.replaceAll("_", " ")),
      h("td", { "data-label": "Value" }, value(name)),
      h("td", { "data-label": "Why" }, reasons[name] || "as requested"),
    ),
  );
  const classes = Object.entries(e.gpu_classes || {}).map(([name, c]) =>
    h(
      "tr",
      { class: name === result.gpu_class ? "chosen" : null },
      h("th", { scope: "row", "data-label": "GPU class" }, name),
      h("td", { class: "num", "data-label": "Duration" }, formatDuration(c.duration_seconds)),
      h("td", { class: "num", "data-label": "Cost" }, formatCost(c.cost_usd)),
      h("td", { class: "num", "data-label": "Peak memory" }, `${c.peak_memory_gib} GiB`),
      h("td", { "data-label": "Memory" }, c.fits ? "fits" : "does not fit"),
    ),
  );
  return h(
    "div",
    { id: "estimate-result" },
    h(
      "dl",
      { class: "stats" },
      [
        ["Optimizer steps", formatNumber(e.optimizer_steps)],
        ["Trained tokens", formatNumber(e.trained_tokens)],
        ["Examples", `${formatNumber(e.train_examples)} train · ${formatNumber(e.valid_examples)} validation`],
        ["Tokens per example", e.train_tokens ? `median ${e.train_tokens.p50}, p95 ${e.train_tokens.p95}, max ${e.train_tokens.max}` : "—"],
        ["Truncated examples", formatNumber(e.train_tokens?.truncated_examples)],
        ["Padding waste", e.padding_waste != null ? `${Math.round(e.padding_waste * 100)}%` : "—"],
      ].map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
    ),
    tableWrap(
      h(
        "table",
        { id: "estimate-classes", class: "stack" },
        h("caption", {}, "Duration and cost per GPU class"),
        h("thead", {}, h("tr", {}, ["GPU class", "Duration", "Cost", "Peak memory", "Memory"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, classes),
      ),
    ),
    tableWrap(
      h(
        "table",
        { id: "estimate-settings", class: "stack" },
        h("caption", {}, "Settings and why"),
        h("thead", {}, h("tr", {}, ["Setting", "Value", "Why"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, settings),
      ),
    ),
    (e.notes || []).map((note) => h("p", { class: "notice" }, note)),
  );
}

// -- models -----------------------------------------------------------------------------------------

async function modelsPage(signal) {
  heading("Models");
  const models = await api.get("/v1/models", { signal });
  const rows = models.data.map((m) =>
    h(
      "tr",
      {},
      h("th", { scope: "row" }, h("code", {}, m.id)),
      h("td", {}, m.fine_tuned ? h("a", { href: `#/jobs/${encodeURIComponent(m.fine_tuning_job)}` }, "fine-tuned") : m.description || "—"),
      h("td", {}, m.license || "—"),
      h("td", { class: "num" }, m.max_seq_length ? formatNumber(m.max_seq_length) : "—"),
      h("td", {}, (m.tasks || []).join(", ") || "—"),
    ),
  );
  append(
    view(),
    tableWrap(
      h(
        "table",
        { id: "models-table" },
        h("caption", { class: "visually-hidden" }, "Base models of the catalog and your fine-tuned models"),
        h("thead", {}, h("tr", {}, ["Model", "About", "Licence", "Context", "Methods"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows),
      ),
    ),
  );
}

// -- start ------------------------------------------------------------------------------------------

api.whenUnauthorized((error) => {
  api.signOut();
  signInReason = `Your API key is no longer accepted (${error.message}). Sign in again.`;
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin";
});

document.getElementById("sign-out").addEventListener("click", () => {
  api.signOut();
  location.hash = "#/signin";
});
window.addEventListener("hashchange", route);
route();
