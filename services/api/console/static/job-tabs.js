// The tabs of a finished job's page: Evaluation (base versus tuned, per group, the generated replies),
// Playground (one prompt to several models at once) and Export (the artifacts and the model card).
// Each builds its panel when first opened; `ctx` gives the job, the page's AbortSignal and the job's
// artifact archive (fetched once, read in the browser: see tar.js).
import * as api from "./api.js";
import { append, bars, errorBox, h, replace, stats, tableWrap } from "./dom.js";
import { formatBytes, formatNumber } from "./data.js";
import { subTar } from "./tar.js";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";
import { marked } from "./vendor/marked/marked.esm.js";

// [key in the report, name, which way is better], per task: what its evaluation measures.
const METRICS_OF_TASK = {
  supervised: [
    ["loss", "Loss", "low"],
    ["perplexity", "Perplexity", "low"],
    ["mean_token_accuracy", "Token accuracy", "high"],
    ["exact_match", "Exact match", "high"],
    ["rouge_l", "ROUGE-L F1", "high"],
    ["bleu", "BLEU", "high"],
    ["chrf", "chrF", "high"],
  ],
  classification: [
    ["accuracy", "Accuracy", "high"],
    ["macro_f1", "Macro-F1", "high"],
    ["loss", "Loss", "low"],
  ],
  dpo: [
    ["preference_accuracy", "Preference accuracy", "high"],
    ["logp_margin", "Log-prob margin (chosen − rejected)", "high"],
    ["loss", "DPO loss", "low"],
    ["reward_accuracy", "Reward accuracy", "high"],
    ["reward_margin", "Reward margin", "high"],
    ["chosen_reward", "Chosen reward", "high"],
    ["rejected_reward", "Rejected reward", "low"],
  ],
  orpo: [
    ["preference_accuracy", "Preference accuracy", "high"],
    ["logp_margin", "Log-prob margin (chosen − rejected)", "high"],
    ["loss", "Loss on the chosen replies", "low"],
    ["perplexity", "Perplexity", "low"],
    ["mean_token_accuracy", "Token accuracy", "high"],
  ],
  kto: [
    ["preference_accuracy", "Desirable ranked above undesirable", "high"],
    ["logp_margin", "Log-prob margin (desirable − undesirable)", "high"],
    ["desirable_logp", "Desirable log-prob", "high"],
    ["undesirable_logp", "Undesirable log-prob", "low"],
    ["loss", "KTO loss", "low"],
    ["reward_accuracy", "Reward accuracy", "high"],
    ["desirable_reward", "Desirable reward", "high"],
    ["undesirable_reward", "Undesirable reward", "low"],
  ],
};
const ALL_METRICS = Object.values(METRICS_OF_TASK).flat();
const NAMES = Object.fromEntries(ALL_METRICS.map(([key, name]) => [key, name]));
const LOWER_IS_BETTER = new Set(ALL_METRICS.filter(([, , way]) => way === "low").map(([key]) => key));
// The figure per-group rows compare besides the loss.
const MAIN_OF_TASK = { classification: "accuracy", dpo: "preference_accuracy", orpo: "preference_accuracy", kto: "preference_accuracy" };

function num(v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return "—";
  return Math.abs(v) >= 10 ? v.toFixed(2) : v.toFixed(4);
}

function signed(v) {
  return typeof v === "number" && Number.isFinite(v) ? `${v > 0 ? "+" : v < 0 ? "−" : "±"}${num(Math.abs(v))}` : "—";
}

// "better", "worse" or "same" for the tuned value against the base one.
function compare(metric, base, tuned) {
  if (typeof base !== "number" || typeof tuned !== "number") return null;
  const change = tuned - base;
  if (Math.abs(change) < 1e-9) return "same";
  return (LOWER_IS_BETTER.has(metric) ? change < 0 : change > 0) ? "better" : "worse";
}

function tag(kind, text = kind) {
  return h("span", { class: `tag tag-${kind}` }, text);
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// -- evaluation -------------------------------------------------------------------------------------

export async function evaluationPanel(panel, ctx) {
  const job = ctx.job();
  await evaluationReport(panel, job.evaluation, {
    signal: ctx.signal,
    generations: async () => {
      const listing = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/artifacts`, { signal: ctx.signal });
      if (!listing.data.some((f) => f.path === "generations.jsonl")) return null;
      return (await artifactFile(job.id, "generations.jsonl", ctx.signal)).text();
    },
  });
}

// An evaluation report (a job's, or a standalone evaluation's) into `holder`: the verdict, base against
// tuned on the task's figures (a catalog model evaluated alone has one column), the task's own views
// (a classifier's confusion matrices and per-class scores, DPO's margins), the per-group figures, and the
// generated replies (`generations()` resolves to the JSONL text, or null when there are none).
export async function evaluationReport(holder, ev, { signal, generations = null }) {
  const task = ev.task || "supervised";
  const alone = !ev.fine_tuned;
  const verdictClass = ev.verdict === "improved" ? "notice-ok" : ev.verdict === "regressed" ? "notice-error" : "";
  const rows = ev.generation?.n_examples;
  append(
    holder,
    alone
      ? h("p", { class: "notice", id: "verdict" }, h("strong", {}, "The model alone"), " (a catalog model: no base to compare with).")
      : h("p", { class: `notice ${verdictClass}`, id: "verdict" }, h("strong", {}, `Verdict: ${ev.verdict}.`), " ", ev.verdict_summary || ""),
    h(
      "p",
      { class: "hint" },
      `Scored on ${formatNumber(ev.n_examples)} ${String(ev.validation_source || "validation").replaceAll("_", " ")} ${task === "dpo" || task === "orpo" ? "pairs" : "rows"}`,
      ev.n_tokens ? ` (${formatNumber(ev.n_tokens)} tokens)` : "",
      rows ? `; ${rows} replies generated (${ev.generation.decoding})` : "",
      ".",
    ),
  );
  const metrics = (METRICS_OF_TASK[task] || METRICS_OF_TASK.supervised).filter(([key]) => ev.base?.[key] != null || ev.fine_tuned?.[key] != null);
  const metricRows = metrics.map(([key, name]) => {
    const base = ev.base?.[key];
    const tuned = ev.fine_tuned?.[key];
    const how = compare(key, base, tuned);
    return h(
      "tr",
      { class: how === "worse" ? "worse" : null },
      h("th", { scope: "row" }, name),
      h("td", { class: "num" }, num(base)),
      alone ? null : h("td", { class: "num" }, num(tuned)),
      alone ? null : h("td", { class: "num" }, signed(typeof tuned === "number" && typeof base === "number" ? tuned - base : null), " ", how && how !== "same" ? tag(how) : null),
    );
  });
  append(
    holder,
    tableWrap(
      h(
        "table",
        { id: "evaluation-metrics" },
        h("caption", {}, alone ? "The model's figures" : "Base and tuned model"),
        h("thead", {}, h("tr", {}, (alone ? ["Metric", "Model"] : ["Metric", "Base", "Tuned", "Change"]).map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, metricRows),
      ),
    ),
  );
  if (task === "classification") append(holder, classificationViews(ev));
  if (task === "dpo" && !alone) append(holder, preferenceViews(ev));
  if (!alone) append(holder, groupsSection(ev, task));
  if (task !== "supervised" || !generations) return;

  const section = h(
    "section",
    { class: "card", id: "generations", "aria-labelledby": "generations-heading", "aria-busy": "true" },
    h("h2", { id: "generations-heading" }, "Generated replies"),
    h("p", { class: "hint" }, "Reading the replies…"),
  );
  append(holder, section);
  try {
    const body = await generations();
    const lines = body ? body.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line)) : [];
    section.removeAttribute("aria-busy");
    if (!lines.length) {
      replace(section, section.firstChild, h("p", { class: "hint" }, "This evaluation generated no replies."));
      return;
    }
    const shown = lines.slice(0, 12);
    replace(
      section,
      section.firstChild,
      h("p", { class: "hint" }, `The prompt, the reference reply and ${alone ? "the model's reply" : "both models' replies"} (greedy), with each reply's chrF against the reference; ${shown.length} of ${lines.length}.`),
      shown.map(generationCard),
    );
  } catch (error) {
    if (!signal?.aborted) replace(section, section.firstChild, errorBox(error));
  }
}

// A classifier's confusion matrices (rows: the true label, columns: the predicted one) and per-class scores.
function classificationViews(ev) {
  const labels = ev.labels || [];
  const matrix = (name, figures) => {
    const m = figures?.confusion_matrix;
    if (!m) return null;
    const largest = Math.max(1, ...m.flat());
    return tableWrap(
      h(
        "table",
        { class: "confusion", id: `confusion-${name.toLowerCase()}` },
        h("caption", {}, `Confusion matrix, ${name.toLowerCase()} model (rows: true label, columns: predicted)`),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "true \\ predicted"), labels.map((l) => h("th", { scope: "col" }, l)))),
        h(
          "tbody",
          {},
          m.map((row, i) =>
            h(
              "tr",
              {},
              h("th", { scope: "row" }, labels[i]),
              row.map((n, j) => {
                const cell = h("td", { class: `num ${i === j ? "diagonal" : n ? "confused" : ""}` }, formatNumber(n));
                // Shade by count (through the CSSOM: the page's CSP forbids style attributes).
                cell.style.setProperty("--share", (n / largest).toFixed(3));
                return cell;
              }),
            ),
          ),
        ),
      ),
    );
  };
  const perClass = ev.fine_tuned?.per_class || ev.base?.per_class || {};
  const base = ev.base?.per_class || {};
  return h(
    "section",
    { class: "card", id: "classification", "aria-labelledby": "classification-heading" },
    h("h2", { id: "classification-heading" }, "Per class"),
    h("div", { class: "matrices" }, matrix("Base", ev.fine_tuned ? ev.base : null), matrix(ev.fine_tuned ? "Tuned" : "Model", ev.fine_tuned || ev.base)),
    tableWrap(
      h(
        "table",
        { id: "per-class" },
        h("caption", {}, "Precision, recall and F1 per class"),
        h("thead", {}, h("tr", {}, ["Label", "Rows", "Precision", "Recall", "F1", ev.fine_tuned ? "Base F1" : null].filter(Boolean).map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          Object.entries(perClass).map(([label, c]) => {
            const how = ev.fine_tuned ? compare("f1", base[label]?.f1, c.f1) : null;
            return h(
              "tr",
              { class: how === "worse" ? "worse" : null },
              h("th", { scope: "row" }, label),
              h("td", { class: "num" }, formatNumber(c.support)),
              h("td", { class: "num" }, num(c.precision)),
              h("td", { class: "num" }, num(c.recall)),
              h("td", { class: "num" }, num(c.f1), " ", how && how !== "same" ? tag(how) : null),
              ev.fine_tuned ? h("td", { class: "num" }, num(base[label]?.f1)) : null,
            );
          }),
        ),
      ),
    ),
  );
}

// DPO: how far the tuned model prefers the chosen reply over the rejected one, against the base.
function preferenceViews(ev) {
  const b = ev.base || {};
  const t = ev.fine_tuned || {};
  const items = [
    ["base: log-prob margin", b.logp_margin],
    ["tuned: log-prob margin", t.logp_margin],
    ["tuned: chosen reward", t.chosen_reward],
    ["tuned: rejected reward", t.rejected_reward],
  ].filter(([, v]) => typeof v === "number");
  return h(
    "section",
    { class: "card", id: "preference", "aria-labelledby": "preference-heading" },
    h("h2", { id: "preference-heading" }, "Margins"),
    h("p", { class: "hint" }, `How much more likely each model finds the chosen reply than the rejected one (mean log-probability margin), and the tuned model's implicit rewards (β = ${ev.beta}). Preference accuracy is the share of pairs whose margin is positive.`),
    stats([
      ["Preference accuracy", `${num(b.preference_accuracy)} → ${num(t.preference_accuracy)}`],
      ["Log-prob margin", `${signed(b.logp_margin)} → ${signed(t.logp_margin)}`],
      ["Reward accuracy (chance 0.5)", num(t.reward_accuracy)],
      ["Reward margin", signed(t.reward_margin)],
    ], { id: "preference-figures" }),
    bars("Margins and rewards (absolute values)", items.map(([k, v]) => [`${k} (${signed(v)})`, Math.abs(v)]), { id: "margins-chart", format: num }),
  );
}

function groupsSection(ev, task) {
  const section = h("section", { class: "card", id: "groups", "aria-labelledby": "groups-heading" }, h("h2", { id: "groups-heading" }, "Per group"));
  const by = ev.by_group;
  if (!by?.groups || !Object.keys(by.groups).length) {
    append(
      section,
      h("p", { class: "hint" }, "The validation rows carry no ", h("code", {}, "group"), " field, so there are no per-group figures. Give rows a group (a language, a region, a customer segment) to see whether the tuned model serves some groups worse than the base did."),
    );
    return section;
  }
  const main = ev.generation?.main_metric || MAIN_OF_TASK[task];
  const worse = [];
  const rows = Object.entries(by.groups).map(([group, g]) => {
    const lossHow = compare("loss", g.base?.loss, g.fine_tuned?.loss);
    const mainHow = main ? compare(main, g.base?.[main], g.fine_tuned?.[main]) : null;
    const isWorse = lossHow === "worse" || mainHow === "worse";
    if (isWorse) worse.push(group);
    return h(
      "tr",
      { class: isWorse ? "worse" : null, dataset: { group } },
      h("th", { scope: "row" }, group),
      h("td", { class: "num" }, formatNumber(g.n_examples)),
      h("td", { class: "num" }, num(g.base?.loss)),
      h("td", { class: "num" }, num(g.fine_tuned?.loss), " ", lossHow && lossHow !== "same" ? tag(lossHow) : null),
      main ? h("td", { class: "num" }, num(g.base?.[main])) : null,
      main ? h("td", { class: "num" }, num(g.fine_tuned?.[main]), " ", mainHow && mainHow !== "same" ? tag(mainHow) : null) : null,
    );
  });
  append(
    section,
    worse.length
      ? h("p", { class: "notice notice-error", role: "note" }, h("strong", {}, `The tuned model is worse than the base for ${worse.length === 1 ? "group" : "groups"} ${worse.join(", ")}.`), " A better average can hide a group that lost: look at these rows before you use the model.")
      : h("p", { class: "notice notice-ok" }, "The tuned model is no worse than the base for any group."),
    tableWrap(
      h(
        "table",
        { id: "group-metrics" },
        h("caption", {}, `By ${by.field || "group"}`),
        h(
          "thead",
          {},
          h("tr", {}, ["Group", "Rows", "Base loss", "Tuned loss", ...(main ? [`Base ${NAMES[main]}`, `Tuned ${NAMES[main]}`] : [])].map((t) => h("th", { scope: "col" }, t))),
        ),
        h("tbody", {}, rows),
      ),
    ),
  );
  const gaps = by.gaps || {};
  const gapItems = ["loss", main]
    .filter((metric) => metric && gaps.base?.[metric] && gaps.fine_tuned?.[metric])
    .map((metric) => {
      const b = gaps.base[metric];
      const t = gaps.fine_tuned[metric];
      const change = by.gap_change?.[metric];
      return [
        `${NAMES[metric]} gap between groups`,
        h(
          "span",
          {},
          `${num(b.gap)} → ${num(t.gap)} (worst: ${t.worst_group}, best: ${t.best_group}) `,
          typeof change === "number" && change > 1e-9 ? tag("worse", "widened") : typeof change === "number" && change < -1e-9 ? tag("better", "narrowed") : null,
        ),
      ];
    });
  if (gapItems.length) append(section, stats(gapItems));
  if (by.n_without_group) append(section, h("p", { class: "hint" }, `${formatNumber(by.n_without_group)} rows have no group.`));
  return section;
}

function messageText(message) {
  const content = message.content;
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((part) => part.text || "").join("");
  return JSON.stringify(content);
}

function generationCard(row, i) {
  const prompt = Array.isArray(row.prompt) ? row.prompt : [{ role: "user", content: String(row.prompt) }];
  const reply = (label, text, scores, kind) =>
    h(
      "div",
      { class: `reply reply-${kind}` },
      h("h4", {}, label, scores && typeof scores.chrf === "number" ? h("span", { class: "score" }, ` chrF ${scores.chrf.toFixed(1)}`) : null),
      h("p", {}, text || h("em", {}, "(empty)")),
    );
  return h(
    "article",
    { class: "generation", "aria-label": `Generated reply ${i + 1}` },
    h("h3", {}, `Prompt ${i + 1}`, row.group != null ? h("span", { class: "tag" }, `group ${row.group}`) : null),
    h(
      "div",
      { class: "prompt" },
      prompt.map((m) => h("p", {}, h("span", { class: "role" }, `${m.role}: `), messageText(m))),
    ),
    h(
      "div",
      { class: "replies" },
      reply("Reference", row.reference, null, "reference"),
      reply("Base", row.base, row.base_scores, "base"),
      reply("Tuned", row.fine_tuned, row.fine_tuned_scores, "tuned"),
    ),
  );
}

// -- playground -------------------------------------------------------------------------------------

export async function playgroundPanel(panel, ctx) {
  const job = ctx.job();
  const checkpoints = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/checkpoints?limit=20`, { signal: ctx.signal }).catch(() => ({ data: [] }));
  // Each checkpoint is asked by its own name (POST /v1/chat/completions answers them too). A step can be
  // listed twice (a periodic save at the last step, then the final adapter) under one name: one box.
  const names = new Set();
  const steps = checkpoints.data.filter((c) => !names.has(c.fine_tuned_model_checkpoint) && names.add(c.fine_tuned_model_checkpoint));
  const models = [
    { id: job.model, label: "Base", answer: "Base model's answer", checked: true },
    { id: job.fine_tuned_model, label: "Tuned", answer: "Tuned model's answer", checked: true },
    ...steps.map((c) => ({ id: c.fine_tuned_model_checkpoint, label: `Checkpoint at step ${c.step_number}`, answer: `Step ${c.step_number} checkpoint's answer`, checked: false })),
  ];
  const choice = (m, i) =>
    h(
      "div",
      { class: "check" },
      h("input", { type: "checkbox", id: `try-model-${i}`, name: "model", value: m.id, checked: m.checked }),
      h("label", { for: `try-model-${i}` }, `${m.label}: `, h("code", {}, m.id)),
    );
  const prompt = h("textarea", { id: "try-prompt", name: "prompt", rows: "3", required: true, placeholder: "Who are you?" });
  const maxTokens = h("input", { id: "try-max-tokens", type: "number", min: "1", max: "512", value: "64", inputmode: "numeric" });
  const temperature = h("input", { id: "try-temperature", type: "number", min: "0", max: "2", step: "0.1", value: "0", inputmode: "decimal", "aria-describedby": "try-temperature-hint" });
  const message = h("div", { role: "alert" });
  const ask = h("button", { type: "submit", class: "primary" }, "Ask");
  const answers = h("div", { class: "answers", id: "answers", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", id: "playground", novalidate: true },
    h("div", { class: "field" }, h("label", { for: "try-prompt" }, "Prompt"), prompt),
    h(
      "fieldset",
      {},
      h("legend", {}, "Ask these models"),
      models.map(choice),
      checkpoints.data.length ? h("p", { class: "hint", id: "checkpoint-note" }, "A checkpoint answers with the adapter as it was at that step.") : null,
    ),
    h(
      "div",
      { class: "grid" },
      h("div", { class: "field" }, h("label", { for: "try-max-tokens" }, "Max tokens"), maxTokens),
      h("div", { class: "field" }, h("label", { for: "try-temperature" }, "Temperature"), temperature, h("p", { class: "hint", id: "try-temperature-hint" }, "0 answers greedily: the same prompt gets the same answer.")),
    ),
    message,
    ask,
  );
  append(panel, form, answers);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(message);
    const text = prompt.value.trim();
    const chosen = [...form.querySelectorAll("input[name=model]:checked")].map((input) => models.find((m) => m.id === input.value));
    if (!text) {
      append(message, h("p", { class: "notice notice-error" }, "Write a prompt."));
      prompt.focus();
      return;
    }
    if (!chosen.length) {
      append(message, h("p", { class: "notice notice-error" }, "Choose at least one model."));
      return;
    }
    ask.disabled = true;
    const cards = chosen.map((m) => {
      const body = h("div", { class: "answer-body" }, h("p", { class: "hint" }, "Waiting for an inference worker…"));
      const card = h("article", { class: "answer card", "aria-label": m.answer, "aria-busy": "true", dataset: { model: m.id } }, h("h3", {}, m.label, " ", h("code", {}, m.id)), body);
      return { m, card, body };
    });
    replace(answers, h("p", { class: "visually-hidden" }, `Asked ${chosen.length} models.`), h("div", { class: "answer-grid" }, cards.map((c) => c.card)));
    await Promise.all(
      cards.map(async ({ m, card, body }) => {
        const started = performance.now();
        try {
          const reply = await api.post(
            "/v1/chat/completions",
            { model: m.id, messages: [{ role: "user", content: text }], max_tokens: Number(maxTokens.value) || 64, temperature: Number(temperature.value) || 0 },
            { signal: ctx.signal },
          );
          const choice = reply.choices[0];
          replace(
            body,
            h("p", { class: "answer-text" }, choice.message.content || h("em", {}, "(empty)")),
            h("p", { class: "hint" }, `${reply.usage.completion_tokens} tokens, ${choice.finish_reason === "length" ? "cut at the token limit" : "finished"}, in ${((performance.now() - started) / 1000).toFixed(1)} s`),
          );
        } catch (error) {
          if (!ctx.signal.aborted) replace(body, errorBox(error));
        } finally {
          card.removeAttribute("aria-busy");
        }
      }),
    );
    ask.disabled = false;
  });
}

// -- export -----------------------------------------------------------------------------------------

const PART_NAMES = {
  adapter: "the adapter (LoRA, PEFT safetensors)",
  merged: "the merged model (base with the adapter merged in)",
  tokenizer: "the tokenizer",
  weights: "the weights",
};

export async function exportPanel(panel, ctx) {
  const job = ctx.job();
  const listing = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/artifacts`, { signal: ctx.signal });
  if (!listing.data.length) {
    append(panel, h("p", { class: "empty" }, "This job has no artifacts."));
    return;
  }
  const feedback = h("div", { role: "status", class: "feedback" });
  const folders = new Map();
  for (const file of listing.data) {
    const cut = file.path.indexOf("/");
    if (cut < 0) continue;
    const folder = file.path.slice(0, cut);
    const entry = folders.get(folder) || { files: 0, bytes: 0 };
    entry.files += 1;
    entry.bytes += file.bytes;
    folders.set(folder, entry);
  }
  const total = listing.data.reduce((sum, f) => sum + f.bytes, 0);
  const download = async (button, name, make) => {
    button.disabled = true;
    replace(feedback, h("p", {}, `Preparing ${name}…`));
    try {
      saveBlob(await make(), name);
      replace(feedback, h("p", {}, `Downloaded ${name}.`));
    } catch (error) {
      if (!ctx.signal.aborted) replace(feedback, errorBox(error));
    } finally {
      button.disabled = false;
    }
  };
  const partButton = (folder, { files, bytes }) => {
    const name = `${job.id}-${folder}.tar`;
    const button = h("button", { type: "button", dataset: { part: folder } }, `Download ${folder} (.tar)`);
    button.addEventListener("click", () => download(button, name, async () => subTar(await ctx.archive(), `${folder}/`)));
    return h("li", {}, button, ` ${PART_NAMES[folder] || folder}: ${files} files, ${formatBytes(bytes)}`);
  };
  const everything = h("button", { type: "button", class: "primary", id: "download-everything" }, "Download everything (.tar)");
  everything.addEventListener("click", () =>
    download(everything, `${job.id}.tar`, async () => (await api.download(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/artifacts/archive`, { signal: ctx.signal })).blob()),
  );
  const fileButton = (f) => {
    const button = h("button", { type: "button", class: "small", "aria-label": `Download ${f.path}` }, "Download");
    const name = `${job.id}-${f.path.replaceAll("/", "-")}`;
    button.addEventListener("click", () => download(button, name, async () => (await artifactFile(job.id, f.path, ctx.signal)).blob()));
    return button;
  };
  append(
    panel,
    h(
      "section",
      { class: "card", "aria-labelledby": "downloads-heading" },
      h("h2", { id: "downloads-heading" }, "Downloads"),
      h(
        "ul",
        { class: "downloads" },
        [...folders].map(([folder, entry]) => partButton(folder, entry)),
        h("li", {}, everything, ` every artifact: ${listing.data.length} files, ${formatBytes(total)}`),
      ),
      folders.has("merged")
        ? null
        : h("p", { class: "hint", id: "merged-note" }, "No merged model: it is exported only when the job is created with ", h("code", {}, '"export_merged": true'), " (the new-job form's advanced settings)."),
      feedback,
    ),
    await hubSection(job, ctx.signal),
  );
  const card = h(
    "section",
    { class: "card", id: "model-card", "aria-labelledby": "model-card-heading", "aria-busy": "true" },
    h("h2", { id: "model-card-heading" }, "Model card (README.md)"),
    h("p", { class: "hint" }, "Reading it from the artifacts…"),
  );
  append(
    panel,
    card,
    tableWrap(
      h(
        "table",
        { id: "artifacts-table" },
        h("caption", {}, "Artifacts"),
        h("thead", {}, h("tr", {}, ["Path", "Size", h("span", { class: "visually-hidden" }, "Download")].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          listing.data.map((f) => h("tr", {}, h("td", {}, h("code", {}, f.path)), h("td", { class: "num" }, formatBytes(f.bytes)), h("td", {}, fileButton(f)))),
        ),
      ),
    ),
  );
  try {
    const text = listing.data.some((f) => f.path === "README.md") ? await (await artifactFile(job.id, "README.md", ctx.signal)).text() : null;
    replace(card, card.firstChild, text ? modelCard(text) : h("p", { class: "hint" }, "This job has no model card."));
  } catch (error) {
    if (!ctx.signal.aborted) replace(card, card.firstChild, errorBox(error));
  } finally {
    card.removeAttribute("aria-busy");
  }
}

// One artifact's bytes (GET …/artifacts/files/{path}).
export function artifactFile(jobId, path, signal) {
  const encoded = path.split("/").map(encodeURIComponent).join("/");
  return api.download(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/artifacts/files/${encoded}`, { signal });
}

// The model card rendered: its metadata (the YAML front matter) as terms, its Markdown through marked,
// then DOMPurify (the card quotes names users chose, such as the training file's: no HTML of theirs runs
// or loads anything), and the source a click away.
function modelCard(text) {
  const front = text.match(/^---\n([\s\S]*?)\n---\n/);
  const body = front ? text.slice(front[0].length) : text;
  const meta = front ? front[1].split("\n").filter((line) => line.includes(":")).map((line) => [line.slice(0, line.indexOf(":")).trim(), line.slice(line.indexOf(":") + 1).trim()]) : [];
  const rendered = h("div", { class: "markdown", id: "model-card-rendered" });
  rendered.append(DOMPurify.sanitize(marked.parse(body, { async: false }), { RETURN_DOM_FRAGMENT: true, FORBID_TAGS: ["style", "form", "input"], FORBID_ATTR: ["style"] }));
  for (const table of rendered.querySelectorAll("table")) table.replaceWith(tableWrap(table.cloneNode(true)));
  for (const link of rendered.querySelectorAll("a[href]")) link.setAttribute("rel", "noopener noreferrer");
  return [
    meta.length ? stats(meta, { id: "model-card-meta" }) : null,
    rendered,
    h("details", {}, h("summary", {}, "Markdown source"), h("pre", { class: "model-card", tabindex: "0", role: "region", "aria-label": "Model card source" }, text)),
  ];
}

// Where the job's artifacts were published (hub_repo): the outcome from its events.
async function hubSection(job, signal) {
  const section = h("section", { class: "card", id: "hub", "aria-labelledby": "hub-heading" }, h("h2", { id: "hub-heading" }, "Hugging Face Hub"));
  if (!job.hub_repo) {
    append(section, h("p", { class: "hint", id: "hub-status" }, "Not published: a job publishes its artifacts and model card to a Hub repository when created with ", h("code", {}, "hub_repo"), " (the new-job form's advanced settings) on a server with a Hub token."));
    return section;
  }
  const events = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/events?limit=100`, { signal });
  const published = events.data.find((e) => e.message.startsWith("Published to the Hugging Face Hub"));
  const failed = events.data.find((e) => e.message.startsWith("Publishing to the Hugging Face Hub"));
  const status = published ? ["notice-ok", published.message] : failed ? ["notice-error", failed.message] : ["", job.stage === "succeeded" ? "Publishing…" : "Published once the job succeeds."];
  append(section, h("p", {}, "Repository: ", h("code", {}, job.hub_repo)), h("p", { class: `notice ${status[0]}`, id: "hub-status" }, status[1]));
  return section;
}

// -- learning-rate sweep ----------------------------------------------------------------------------

export function sweepTable(job) {
  const chosen = job.hyperparameters?.learning_rate_multiplier;
  return tableWrap(
    h(
      "table",
      { id: "sweep-results" },
      h("caption", {}, "Learning-rate sweep: the trial of lowest validation loss trained the job"),
      h("thead", {}, h("tr", {}, ["Multiplier", "Learning rate", "Steps", "Validation loss", "Token accuracy"].map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        {},
        job.sweep_results.map((r) =>
          h(
            "tr",
            { class: r.learning_rate_multiplier === chosen ? "chosen" : null },
            h("th", { scope: "row" }, `×${r.learning_rate_multiplier}`, r.learning_rate_multiplier === chosen ? h("span", { class: "tag tag-best" }, "chosen") : null),
            h("td", { class: "num" }, Number(r.learning_rate).toExponential(2)),
            h("td", { class: "num" }, formatNumber(r.steps)),
            h("td", { class: "num" }, num(r.valid_loss)),
            h("td", { class: "num" }, num(r.valid_mean_token_accuracy)),
          ),
        ),
      ),
    ),
  );
}
