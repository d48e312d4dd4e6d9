// Standalone evaluations (/v1/evaluations): any catalog chat model or fine-tuned model of the
// organization measured on any validation file, on its own; the list, a form to start one, and its report
// (shown as a job's evaluation is: see evaluationReport in job-tabs.js).
import * as api from "./api.js";
import { append, errorBox, h, heading, replace, stats, tableWrap, view } from "./dom.js";
import { formatNumber, formatTime } from "./data.js";
import { evaluationReport } from "./job-tabs.js";

const FINISHED = new Set(["succeeded", "failed"]);

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

export async function evaluationsPage(params, signal) {
  heading("Evaluations");
  const [evaluations, models, files] = await Promise.all([
    api.get("/v1/evaluations?limit=100", { signal }),
    api.get("/v1/models", { signal }),
    api.get("/v1/files?limit=1000", { signal }),
  ]);
  const chat = models.data.filter((m) => m.fine_tuned || (m.tasks || []).includes("supervised"));
  const usable = files.data.filter((f) => f.status === "processed");
  const model = h("select", { id: "eval-model", name: "model", "aria-describedby": "eval-model-hint" }, chat.map((m) => h("option", { value: m.id }, m.fine_tuned ? `${m.id} (fine-tuned)` : m.id)));
  if (params.get("model") && chat.some((m) => m.id === params.get("model"))) model.value = params.get("model");
  const file = h("select", { id: "eval-file", name: "validation_file" }, usable.map((f) => h("option", { value: f.id }, `${f.filename} · ${f.task} · ${formatNumber(f.n_examples)} examples · ${f.id}`)));
  const group = h("input", { id: "eval-group", name: "group_field", type: "text", value: "group", autocomplete: "off", "aria-describedby": "eval-group-hint" });
  const rows = h("input", { id: "eval-rows", name: "generation_rows", type: "number", min: "0", max: "512", value: "16", inputmode: "numeric", "aria-describedby": "eval-rows-hint" });
  const message = h("div", { role: "alert" });
  const button = h("button", { type: "submit", class: "primary" }, "Evaluate");
  const form = h(
    "form",
    { class: "card", id: "evaluation-form", novalidate: true },
    h("h2", {}, "New evaluation"),
    h(
      "div",
      { class: "grid" },
      h("div", { class: "field" }, h("label", { for: "eval-model" }, "Model"), model, h("p", { class: "hint", id: "eval-model-hint" }, "A fine-tuned model is scored beside its base; a catalog model alone.")),
      h("div", { class: "field" }, h("label", { for: "eval-file" }, "Validation file"), file),
      h("div", { class: "field" }, h("label", { for: "eval-group" }, "Group field"), group, h("p", { class: "hint", id: "eval-group-hint" }, "Rows carrying it are also scored per group.")),
      h("div", { class: "field" }, h("label", { for: "eval-rows" }, "Replies to generate"), rows, h("p", { class: "hint", id: "eval-rows-hint" }, "0 to 512 prompts answered (chat models).")),
    ),
    message,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(message);
    if (!file.value) {
      append(message, h("p", { class: "notice notice-error" }, "Upload a validation file first."));
      return;
    }
    button.disabled = true;
    try {
      const body = { model: model.value, validation_file: file.value, group_field: group.value.trim() || null, generation_rows: Number(rows.value) };
      const created = await api.post("/v1/evaluations", body, { signal });
      location.hash = `#/evaluations/${encodeURIComponent(created.id)}`;
    } catch (error) {
      append(message, errorBox(error));
    } finally {
      button.disabled = false;
    }
  });
  const list = evaluations.data.length
    ? tableWrap(
        h(
          "table",
          { id: "evaluations-table", class: "stack" },
          h("caption", {}, "Evaluations, newest first"),
          h("thead", {}, h("tr", {}, ["Evaluation", "Model", "Validation file", "Status", "Verdict", "Created"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            evaluations.data.map((e) =>
              h(
                "tr",
                {},
                h("th", { scope: "row", "data-label": "Evaluation" }, h("a", { href: `#/evaluations/${encodeURIComponent(e.id)}` }, e.id)),
                h("td", { "data-label": "Model" }, h("code", {}, e.model)),
                h("td", { "data-label": "Validation file" }, e.validation_file),
                h("td", { "data-label": "Status" }, h("span", { class: `badge badge-${e.status}` }, e.status)),
                h("td", { "data-label": "Verdict" }, e.report?.verdict || (e.report ? "model alone" : "—")),
                h("td", { "data-label": "Created" }, formatTime(e.created_at)),
              ),
            ),
          ),
        ),
      )
    : h("p", { class: "empty" }, "No evaluations yet.");
  append(view(), chat.length ? form : h("p", { class: "notice" }, "No chat model to evaluate."), list);
}

export async function evaluationPage(evaluationId, signal) {
  heading(`Evaluation ${evaluationId}`, h("a", { href: "#/evaluations", class: "button" }, "All evaluations"));
  const status = h("p", { class: "job-status", id: "evaluation-status" });
  const facts = h("div");
  const report = h("div", { id: "evaluation-report" });
  append(view(), status, facts, report);
  let record = await api.get(`/v1/evaluations/${encodeURIComponent(evaluationId)}`, { signal });
  for (;;) {
    replace(status, h("span", { class: `badge badge-${record.status}` }, record.status), ` ${record.model} on ${record.validation_file}`);
    status.dataset.status = record.status;
    replace(
      facts,
      stats([
        ["Model", h("code", {}, record.model)],
        ["Validation file", h("a", { href: `#/files/${encodeURIComponent(record.validation_file)}` }, record.validation_file)],
        ["Made by job", record.fine_tuning_job ? h("a", { href: `#/jobs/${encodeURIComponent(record.fine_tuning_job)}` }, record.fine_tuning_job) : "— (a catalog model)"],
        ["Group field", record.group_field || "—"],
        ["Created", formatTime(record.created_at)],
        ["Finished", formatTime(record.finished_at)],
      ]),
    );
    if (FINISHED.has(record.status) || signal.aborted) break;
    await sleep(2000, signal);
    if (signal.aborted) return;
    record = await api.get(`/v1/evaluations/${encodeURIComponent(evaluationId)}`, { signal });
  }
  if (record.status === "failed") {
    append(report, h("p", { class: "notice notice-error", role: "alert" }, `${record.error?.code || "error"}: ${record.error?.message || "the evaluation failed"}`));
    return;
  }
  if (record.report) await evaluationReport(report, record.report, { signal });
}
