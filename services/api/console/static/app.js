// The Tunery console: a small single-page app on the public REST API (see api.js). Pages are routed by
// the URL's hash (#/jobs, #/jobs/<id>?tab=…, #/compare?jobs=a,b, #/files, #/files/<id>, #/new, #/models,
// #/evaluations, #/evaluations/<id>, #/keys, #/signin). The job page's evaluation, playground and export
// tabs are in job-tabs.js; the files pages in files.js, evaluations in evaluations.js, keys in keys.js.
import * as api from "./api.js";
import { CompareChart, LossChart } from "./chart.js";
import { announce, append, errorBox, h, heading, replace, stats, tableWrap, view } from "./dom.js";
import { evaluationsPage, evaluationPage } from "./evaluations.js";
import { filePage, filesPage } from "./files.js";
import { evaluationPanel, exportPanel, playgroundPanel, sweepTable } from "./job-tabs.js";
import { keysPage } from "./keys.js";
import { readTar } from "./tar.js";
import { formatCost, formatDuration, formatNumber, formatTime } from "./data.js";

// -- small helpers ----------------------------------------------------------------------------------

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const TASK_OF_METHOD = { supervised: "chat", dpo: "preference", classification: "classification" };

function stageBadge(stage) {
  return h("span", { class: `badge badge-${stage}` }, stage.replaceAll("_", " "));
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

// -- routing ----------------------------------------------------------------------------------------

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
    jobs: () => (parts[1] ? jobPage(decodeURIComponent(parts[1]), params, signal) : jobsPage(signal)),
    compare: () => comparePage(params, signal),
    files: () => (parts[1] ? filePage(decodeURIComponent(parts[1]), signal) : filesPage(signal)),
    new: () => newJobPage(params, signal),
    models: () => modelsPage(signal),
    evaluations: () => (parts[1] ? evaluationPage(decodeURIComponent(parts[1]), signal) : evaluationsPage(params, signal)),
    keys: () => keysPage(signal),
  };
  const page = pages[parts[0]] || pages.jobs;
  for (const link of document.querySelectorAll("#nav a")) {
    const active = link.getAttribute("href") === `#/${parts[0] === "compare" ? "jobs" : parts[0] || "jobs"}`;
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  replace(view());
  Promise.resolve(page()).catch((error) => {
    if (!signal.aborted) append(view(), errorBox(error));
  });
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

// The jobs ticked for comparison: kept across the list's refreshes (and visits) in this tab.
const compareSelection = new Set();

async function jobsPage(signal) {
  const compareButton = h("button", { type: "button", id: "compare-selected", disabled: true, "aria-describedby": "compare-hint" }, "Compare selected");
  const compareHint = h("span", { id: "compare-hint", class: "hint" });
  const updateCompare = () => {
    const n = compareSelection.size;
    compareButton.disabled = n < 2;
    compareButton.textContent = n >= 2 ? `Compare ${n} jobs` : "Compare selected";
    compareHint.textContent = n >= 2 ? "" : `Tick two or more jobs to compare them (${n} ticked).`;
  };
  compareButton.addEventListener("click", () => {
    location.hash = `#/compare?jobs=${[...compareSelection].map(encodeURIComponent).join(",")}`;
  });
  updateCompare();
  heading("Jobs", h("div", { class: "header-actions" }, compareHint, compareButton, h("a", { href: "#/new", class: "button primary" }, "New job")));
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
      const known = new Set(jobs.data.map((job) => job.id));
      for (const id of compareSelection) if (!known.has(id)) compareSelection.delete(id);
      updateCompare();
      const rows = jobs.data.map((job) =>
        h(
          "tr",
          {},
          h(
            "td",
            { "data-label": "Compare", class: "pick" },
            h("input", {
              type: "checkbox",
              "aria-label": `Compare ${job.id}`,
              checked: compareSelection.has(job.id),
              onchange: (event) => {
                if (event.target.checked) compareSelection.add(job.id);
                else compareSelection.delete(job.id);
                updateCompare();
              },
            }),
          ),
          h("th", { scope: "row", "data-label": "Job" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
          h("td", { "data-label": "Model" }, job.model),
          h("td", { "data-label": "Status" }, stageBadge(job.stage)),
          h("td", { "data-label": "Progress" }, progressCell(job)),
          h("td", { "data-label": "Created" }, formatTime(job.created_at)),
        ),
      );
      // The list refreshes in place: keep the keyboard focus on the checkbox or link it was on.
      const focused = holder.contains(document.activeElement) ? document.activeElement : null;
      const focusKey = focused?.getAttribute("aria-label") || focused?.getAttribute("href");
      replace(
        holder,
        tableWrap(
          h(
            "table",
            { id: "jobs-table", class: "stack" },
            h("caption", { class: "visually-hidden" }, "Fine-tuning jobs, newest first"),
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Compare")), ["Job", "Model", "Status", "Progress", "Created"].map((t) => h("th", { scope: "col" }, t)))),
            h("tbody", {}, rows),
          ),
        ),
      );
      if (focusKey) [...holder.querySelectorAll("input, a")].find((el) => (el.getAttribute("aria-label") || el.getAttribute("href")) === focusKey)?.focus();
    }
    first = false;
    await sleep(active ? 2000 : 8000, signal);
  }
}

// -- compare ----------------------------------------------------------------------------------------

const show = (v) => (v == null || v === "" ? "—" : typeof v === "number" ? formatNumber(v) : typeof v === "object" ? JSON.stringify(v) : String(v));
const fixed = (v, digits = 4) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "—");

// What the settings diff shows of a job, in this order; a row whose values differ is highlighted.
const COMPARED_SETTINGS = [
  ["Model", (j) => j.model],
  ["Method", (j) => j.method?.type],
  ["Training file", (j) => j.training_file],
  ["Validation file", (j) => j.validation_file || "held-out split"],
  ["Epochs", (j) => j.hyperparameters?.n_epochs],
  ["Batch size", (j) => j.hyperparameters?.batch_size],
  ["Learning-rate multiplier", (j) => j.hyperparameters?.learning_rate_multiplier],
  ["Learning rate", (j) => j.resolved_hyperparameters?.learning_rate],
  ["Max sequence length", (j) => j.resolved_hyperparameters?.max_seq_length],
  ["Warmup ratio", (j) => j.resolved_hyperparameters?.warmup_ratio],
  ["Scheduler", (j) => j.resolved_hyperparameters?.scheduler],
  ["Packing", (j) => j.resolved_hyperparameters?.packing],
  ["LoRA", (j) => (j.lora ? `r ${j.lora.r}, alpha ${j.lora.alpha}, dropout ${j.lora.dropout}` : null)],
  ["Learning-rate sweep", (j) => j.learning_rate_sweep?.multipliers?.map((m) => `×${m}`).join(", ") || "none"],
  ["Budget", (j) => budgetText(j) || "none"],
  ["Data policy", (j) => j.data_policy],
  ["GPU class", (j) => j.gpu_class],
  ["Seed", (j) => j.seed],
  ["Suffix", (j) => j.suffix],
];

// Evaluation figures: [label, value of a job, which way is better (for marking the best)].
const COMPARED_FIGURES = [
  ["Status", (j) => j.stage],
  ["Verdict", (j) => j.evaluation?.verdict],
  ["Base model loss", (j) => j.evaluation?.base?.loss, null],
  ["Tuned model loss", (j) => j.evaluation?.fine_tuned?.loss, "low"],
  ["Loss change", (j) => j.evaluation?.loss_change, "low"],
  ["Tuned perplexity", (j) => j.evaluation?.fine_tuned?.perplexity, "low"],
  ["Tuned token accuracy", (j) => j.evaluation?.fine_tuned?.mean_token_accuracy, "high"],
  ["Tuned ROUGE-L", (j) => j.evaluation?.fine_tuned?.rouge_l, "high"],
  ["Tuned chrF", (j) => j.evaluation?.fine_tuned?.chrf, "high"],
  ["Tuned exact match", (j) => j.evaluation?.fine_tuned?.exact_match, "high"],
  ["Final training loss", (j) => j.progress?.train_loss, "low"],
  ["Steps", (j) => j.progress?.total_steps],
  ["Trained tokens", (j) => j.trained_tokens],
  ["Cost", (j) => j.usage?.cost_usd, "low"],
  ["Device time", (j) => j.usage?.device_seconds, "low"],
];

function costAgainstBudget(job) {
  const spent = job.usage?.cost_usd;
  const limit = job.budget?.max_cost_usd;
  if (limit == null) return formatCost(spent);
  const share = Math.min(1, (spent || 0) / limit);
  return h(
    "span",
    { class: "budget" },
    `${formatCost(spent)} of ${formatCost(limit)} (${Math.round(share * 100)}%) `,
    h("meter", { min: "0", max: "1", low: "0.75", high: "0.9", optimum: "0", value: share, "aria-label": "Share of the cost budget spent" }),
  );
}

function budgetText(job) {
  const b = job.budget || {};
  const parts = [];
  if (b.max_cost_usd != null) parts.push(`at most ${formatCost(b.max_cost_usd)}`);
  if (b.max_duration_seconds != null) parts.push(`at most ${formatDuration(b.max_duration_seconds)} of training`);
  return parts.join(", ");
}

function figureText(label, value) {
  if (value == null) return "—";
  if (label === "Cost") return formatCost(value);
  if (label === "Device time") return formatDuration(value);
  if (typeof value === "number" && !Number.isInteger(value)) return fixed(value);
  return show(value);
}

async function comparePage(params, signal) {
  const ids = [...new Set((params.get("jobs") || "").split(",").filter(Boolean))];
  heading("Compare jobs", h("a", { href: "#/jobs", class: "button" }, "Choose other jobs"));
  if (ids.length < 2) {
    append(view(), h("p", { class: "empty" }, "Tick two or more jobs on the ", h("a", { href: "#/jobs" }, "jobs list"), " to compare them."));
    return;
  }
  const jobs = await Promise.all(ids.map((id) => api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal })));
  const series = await Promise.all(jobs.map((j) => api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(j.id)}/metrics?max_points=2000`, { signal })));
  if (signal.aborted) return;
  const columns = jobs.map((j) => h("th", { scope: "col" }, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id)));

  const figure = h(
    "figure",
    { class: "chart card", id: "compare-chart" },
    h("figcaption", {}, h("strong", {}, "Training loss"), " ", h("span", { class: "chart-summary" }, jobs.map((j, i) => `${j.id}: ${series[i].data.filter((r) => r.kind === "train").length} steps`).join("; "))),
    h("div", { class: "chart-canvas", "aria-hidden": "true" }),
  );

  let differing = 0;
  const settingRows = COMPARED_SETTINGS.map(([label, pick]) => {
    const values = jobs.map((j) => show(pick(j)));
    const differs = new Set(values).size > 1;
    if (differs) differing += 1;
    return h(
      "tr",
      { class: differs ? "differs" : null, dataset: { setting: label } },
      h("th", { scope: "row" }, label, differs ? h("span", { class: "tag tag-differs" }, "differs") : null),
      values.map((v) => h("td", {}, v)),
    );
  });

  const figureRows = COMPARED_FIGURES.map(([label, pick, better]) => {
    const values = jobs.map(pick);
    const numbers = values.filter((v) => typeof v === "number");
    const best = better && numbers.length > 1 && new Set(numbers).size > 1 ? (better === "low" ? Math.min(...numbers) : Math.max(...numbers)) : null;
    return h(
      "tr",
      {},
      h("th", { scope: "row" }, label),
      values.map((v) => h("td", { class: v === best ? "num best" : "num" }, figureText(label, v), v === best ? h("span", { class: "tag tag-best" }, "best") : null)),
    );
  });

  append(
    view(),
    figure,
    h(
      "section",
      { class: "card", "aria-labelledby": "settings-diff-heading" },
      h("h2", { id: "settings-diff-heading" }, "Settings"),
      h("p", { class: "hint" }, differing ? `${differing} of ${COMPARED_SETTINGS.length} settings differ; they are marked "differs".` : "Every setting is the same."),
      tableWrap(
        h(
          "table",
          { id: "settings-diff" },
          h("caption", { class: "visually-hidden" }, "Settings of the compared jobs"),
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Setting"), columns.map((c) => c.cloneNode(true)))),
          h("tbody", {}, settingRows),
        ),
      ),
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "figures-heading" },
      h("h2", { id: "figures-heading" }, "Evaluation and cost"),
      tableWrap(
        h(
          "table",
          { id: "figures-compared" },
          h("caption", { class: "visually-hidden" }, "Evaluation figures of the compared jobs"),
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Figure"), columns.map((c) => c.cloneNode(true)))),
          h("tbody", {}, figureRows),
        ),
      ),
    ),
  );
  const chart = new CompareChart(figure, jobs.map((j, i) => ({ label: j.id, rows: series[i].data })));
  signal.addEventListener("abort", () => chart.destroy());
}

// The job page's tabs: Training always; the others once the job has something to show there.
const JOB_TABS = [
  ["training", "Training", () => true],
  ["evaluation", "Evaluation", (job) => job.stage === "succeeded" && Boolean(job.evaluation)],
  ["playground", "Playground", (job) => job.stage === "succeeded" && Boolean(job.fine_tuned_model) && job.method?.type !== "classification"],
  ["export", "Export", (job) => TERMINAL.has(job.stage)],
];

async function jobPage(jobId, params, signal) {
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
  const sweep = h("div", { id: "sweep" });
  append(header, status);
  const tablist = h("div", { role: "tablist", class: "tabs", "aria-label": "Job views" });
  const panels = new Map();
  panels.set(
    "training",
    h(
      "div",
      { role: "tabpanel", id: "panel-training", "aria-labelledby": "tab-training", class: "tab-panel" },
      figure,
      sweep,
      h(
        "section",
        { class: "card", "aria-labelledby": "events-heading" },
        h("h2", { id: "events-heading" }, "Events"),
        // A scrolling region: focusable, so keyboard users can scroll it; a log, newest first.
        h("div", { class: "events-scroll", role: "log", tabindex: "0", "aria-label": "Job events, newest first" }, log),
      ),
    ),
  );
  const panelHolder = h("div", {}, panels.get("training"));
  append(view(), controls, feedback, stats, outcome, tablist, panelHolder);
  const chart = new LossChart(figure);
  signal.addEventListener("abort", () => chart.destroy());

  // The artifact archive, fetched once and read in the browser (generations, model card, parts).
  let archive = null;
  const context = {
    signal,
    job: () => job,
    archive: () =>
      (archive ??= api
        .download(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/artifacts/archive`, { signal })
        .then((response) => response.arrayBuffer())
        .then(readTar)
        .catch((error) => {
          archive = null;
          throw error;
        })),
  };
  const builders = { evaluation: evaluationPanel, playground: playgroundPanel, export: exportPanel };
  let selected = "training";
  let tabsShown = false;

  function selectTab(key, { focus = false, remember = true } = {}) {
    selected = key;
    if (!panels.has(key)) {
      const panel = h("div", { role: "tabpanel", id: `panel-${key}`, "aria-labelledby": `tab-${key}`, class: "tab-panel", tabindex: "0" });
      panels.set(key, panel);
      panelHolder.append(panel);
      Promise.resolve(builders[key](panel, context)).catch((error) => {
        if (!signal.aborted) append(panel, errorBox(error));
      });
    }
    for (const [name, panel] of panels) panel.hidden = name !== key;
    for (const tab of tablist.querySelectorAll("[role=tab]")) {
      const on = tab.dataset.tab === key;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      if (on && focus) tab.focus();
    }
    if (key === "training") chart.resize();
    if (remember) history.replaceState(null, "", `#/jobs/${encodeURIComponent(job.id)}${key === "training" ? "" : `?tab=${key}`}`);
  }

  function renderTabs() {
    const available = JOB_TABS.filter(([, , when]) => when(job));
    if (tablist.childElementCount === available.length) return;
    replace(
      tablist,
      available.map(([key, label]) =>
        h("button", { type: "button", role: "tab", id: `tab-${key}`, "aria-controls": `panel-${key}`, dataset: { tab: key }, onclick: () => selectTab(key) }, label),
      ),
    );
    tablist.hidden = available.length < 2;
    const has = (name) => available.some(([key]) => key === name);
    // The first time, the tab the address names (#/jobs/<id>?tab=export); later, the one open.
    const key = !tabsShown && has(params.get("tab")) ? params.get("tab") : has(selected) ? selected : "training";
    tabsShown = true;
    selectTab(key, { remember: false });
  }
  tablist.addEventListener("keydown", (event) => {
    // The tabs pattern: arrow keys move between tabs, Home and End to the first and last.
    const tabs = [...tablist.querySelectorAll("[role=tab]")];
    const at = tabs.findIndex((tab) => tab.dataset.tab === selected);
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (to == null) return;
    event.preventDefault();
    selectTab(tabs[(to + tabs.length) % tabs.length].dataset.tab, { focus: true });
  });

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
      ["Cost so far", costAgainstBudget(job)],
      ["Budget", budgetText(job) || "none"],
      ["Estimated cost", estimate ? `${formatCost(estimate.cost_usd)} (${formatDuration(estimate.duration_seconds)})` : "—"],
      ["GPU class", job.gpu_class],
    ];
    replace(stats, items.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    replace(sweep, job.sweep_results?.length ? sweepTable(job) : null);
    renderTabs();
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
        // Nobody awaits this: a failure (or leaving the page meanwhile) must not become an uncaught error.
        try {
          job = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}`, { signal });
          render();
          await loadSeries();
          announce(`Job ${job.id} ${job.stage}.`);
        } catch (error) {
          if (!signal.aborted) replace(feedback, errorBox(error));
        }
      },
    });
  } catch (error) {
    if (!signal.aborted) replace(feedback, errorBox(error));
  }
}

// -- new job ----------------------------------------------------------------------------------------

const DATA_POLICIES = [
  ["warn", "Warn: train on the data as it is, and say what was found"],
  ["redact", "Redact: replace what was found with [REDACTED:kind] before training"],
  ["reject", "Reject: fail the job if any is found"],
];

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
    h(
      "fieldset",
      { id: "data-policy", "aria-describedby": "data-policy-hint" },
      h("legend", {}, "Personal data in the files (data policy)"),
      DATA_POLICIES.map(([value, label], i) =>
        h("div", { class: "check" }, h("input", { type: "radio", id: `data-policy-${value}`, name: "data_policy", value, checked: i === 0 }), h("label", { for: `data-policy-${value}` }, label)),
      ),
      h("p", { class: "hint", id: "data-policy-hint" }, "What the upload's scan found is on each file's page; the model card records the policy."),
    ),
    h(
      "details",
      { class: "advanced", id: "advanced" },
      h("summary", {}, "Advanced: budget, learning-rate sweep, export, hub"),
      h(
        "fieldset",
        {},
        h("legend", {}, "Budget (empty for none)"),
        h(
          "div",
          { class: "grid" },
          field("max_cost_usd", "Max cost (USD)", h("input", { id: "max_cost_usd", name: "max_cost_usd", type: "text", inputmode: "decimal", autocomplete: "off", "aria-describedby": "max_cost_usd-hint" }), "Training stops there, keeping the adapter so far; the job then fails with budget_exceeded."),
          field("max_duration_seconds", "Max training time (seconds)", h("input", { id: "max_duration_seconds", name: "max_duration_seconds", type: "text", inputmode: "numeric", autocomplete: "off", "aria-describedby": "max_duration_seconds-hint" }), "The same, for time spent training."),
        ),
      ),
      h(
        "fieldset",
        {},
        h("legend", {}, "Learning-rate sweep (empty for none)"),
        h(
          "div",
          { class: "grid" },
          field("sweep_multipliers", "Multipliers to try", h("input", { id: "sweep_multipliers", name: "multipliers", type: "text", inputmode: "decimal", placeholder: "0.5, 1, 2", autocomplete: "off", "aria-describedby": "sweep_multipliers-hint" }), "2 to 8, separated by commas; each trains a short trial and the lowest validation loss trains the job."),
          field("sweep_fraction", "Share of steps per trial", h("input", { id: "sweep_fraction", name: "trial_fraction", type: "text", inputmode: "decimal", placeholder: "0.2", autocomplete: "off", "aria-describedby": "sweep_fraction-hint" }), "More than 0, at most 0.5."),
        ),
      ),
      h("div", { class: "check" }, h("input", { id: "export_merged", name: "export_merged", type: "checkbox" }), h("label", { for: "export_merged" }, "Also export merged weights: the base with the adapter merged in (a full-size copy)")),
      field(
        "hub_repo",
        "Publish to a Hugging Face Hub repository (optional)",
        h("input", { id: "hub_repo", name: "hub_repo", type: "text", placeholder: "owner/name", autocomplete: "off", spellcheck: "false", "aria-describedby": "hub_repo-hint" }),
        "When the job succeeds, its artifacts and model card go to this private repository. Needs the server's TUNERY_HF_TOKEN; without one the job is refused with hub_unavailable.",
      ),
    ),
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
    for (const name of ["max_cost_usd", "max_duration_seconds"]) {
      const v = number(name, Number);
      if (v !== "auto") job[name] = v;
    }
    const multipliers = form.querySelector("#sweep_multipliers").value.trim();
    if (multipliers) {
      const list = multipliers.split(/[\s,;]+/).filter(Boolean).map((m) => (Number.isFinite(Number(m)) ? Number(m) : m));
      job.learning_rate_sweep = { multipliers: list };
      const fraction = number("sweep_fraction", Number);
      if (fraction !== "auto") job.learning_rate_sweep.trial_fraction = fraction;
    }
    if (form.querySelector("#export_merged").checked) job.export_merged = true;
    const policy = form.querySelector("input[name=data_policy]:checked")?.value;
    if (policy && policy !== "warn") job.data_policy = policy;
    const hub = form.querySelector("#hub_repo").value.trim();
    if (hub) job.hub_repo = hub;
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

function formatParameters(n) {
  if (n == null) return "—";
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  return `${(n / 1e3).toFixed(0)}K`;
}

// The catalog: each base model's size, context length, licence and what it can be trained for, and
// whether a LoRA job on it fits each GPU class (an evaluator reads the model's files to say; asked once
// per model, in the background).
async function modelsPage(signal) {
  heading("Models");
  const models = await api.get("/v1/models", { signal });
  const catalog = models.data.filter((m) => !m.fine_tuned);
  const tuned = models.data.filter((m) => m.fine_tuned);
  const fitCells = new Map();
  const rows = catalog.map((m) => {
    const size = h("td", { class: "num", "data-label": "Size" }, h("span", { class: "muted" }, "…"));
    const fits = h("td", { "data-label": "Fits (LoRA)" }, h("span", { class: "muted" }, "asking a worker…"));
    fitCells.set(m.id, { size, fits });
    return h(
      "tr",
      { dataset: { model: m.id } },
      h("th", { scope: "row", "data-label": "Model" }, h("code", {}, m.id), m.description ? h("p", { class: "hint" }, m.description) : null),
      size,
      h("td", { class: "num", "data-label": "Context" }, m.max_seq_length ? `${formatNumber(m.max_seq_length)} tokens` : "—"),
      h("td", { "data-label": "Licence" }, m.license || "—"),
      h("td", { "data-label": "Methods" }, (m.tasks || []).join(", ") || "—"),
      fits,
    );
  });
  append(
    view(),
    tableWrap(
      h(
        "table",
        { id: "models-table", class: "stack" },
        h("caption", {}, "Base models of the catalog"),
        h("thead", {}, h("tr", {}, ["Model", "Size", "Context", "Licence", "Methods", "Fits (LoRA)"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows),
      ),
    ),
    h("p", { class: "hint" }, "Fits: the peak memory of a LoRA job (one example per step at the full context length, rank 8) against each GPU class's memory."),
    tuned.length
      ? tableWrap(
          h(
            "table",
            { id: "tuned-models-table", class: "stack" },
            h("caption", {}, "Your fine-tuned models"),
            h("thead", {}, h("tr", {}, ["Model", "Job", "Created"].map((t) => h("th", { scope: "col" }, t)))),
            h(
              "tbody",
              {},
              tuned.map((m) =>
                h(
                  "tr",
                  {},
                  h("th", { scope: "row", "data-label": "Model" }, h("code", {}, m.id)),
                  h("td", { "data-label": "Job" }, h("a", { href: `#/jobs/${encodeURIComponent(m.fine_tuning_job)}` }, m.fine_tuning_job)),
                  h("td", { "data-label": "Created" }, formatTime(m.created)),
                ),
              ),
            ),
          ),
        )
      : null,
  );
  await Promise.all(
    catalog.map(async (m) => {
      const { size, fits } = fitCells.get(m.id);
      try {
        const fit = await api.get(`/v1/models/${m.id.split("/").map(encodeURIComponent).join("/")}/fit`, { signal });
        replace(size, formatParameters(fit.parameters));
        replace(
          fits,
          h(
            "ul",
            { class: "fits" },
            Object.entries(fit.gpu_classes).map(([name, c]) =>
              h("li", { class: c.fits ? "fits-yes" : "fits-no" }, h("strong", {}, name), `: ${c.fits ? "fits" : "does not fit"} (${c.peak_memory_gib} of ${c.memory_gb} GiB)`),
            ),
          ),
        );
      } catch (error) {
        if (signal.aborted) return;
        replace(size, "—");
        replace(fits, h("span", { class: "muted" }, error.message));
      }
    }),
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
