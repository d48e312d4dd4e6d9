// The Files pages: upload by drag and drop or file picker (large files through the Uploads API, in parts),
// with a progress bar; a rejected file's problems as a table (line, field, reason, as the API gives them);
// a good file's first examples (as conversations, preference pairs or labelled rows, read by the server
// whatever the container: JSONL, JSON, CSV or Parquet), its quality and personal-data report with charts,
// and its token counts for a chosen model.
import * as api from "./api.js";
import { append, bars, errorBox, h, heading, replace, stats, tableWrap, view } from "./dom.js";
import { formatBytes, formatNumber, formatTime } from "./data.js";

export async function filesPage(signal) {
  heading("Files");
  const input = h("input", { id: "upload-input", type: "file", class: "visually-hidden", accept: ".jsonl,.json,.csv,.parquet,.gz" });
  const progress = h("progress", { id: "upload-progress", max: "1", value: 0, hidden: true, "aria-label": "Upload progress" });
  const progressText = h("span", { class: "upload-status", role: "status" });
  const zone = h(
    "div",
    { class: "dropzone", id: "dropzone" },
    input,
    h("label", { for: "upload-input" }, h("span", { class: "button primary" }, "Choose a file"), h("span", { class: "drop-hint" }, " or drop it here")),
    h(
      "p",
      { class: "hint" },
      "JSONL, JSON, CSV or Parquet (or gzip-compressed): chat, prompt/completion, Alpaca, ShareGPT, preference pairs or text/label rows. Every line is checked (files over 8 MB just after they are stored); ",
      `files over ${formatBytes(api.PART_BYTES)} go up in parts.`,
    ),
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
      let stored = await api.uploadFile(file, {
        onProgress: (share) => {
          progress.value = share;
          progressText.textContent = share < 1 ? ` Uploading ${file.name}: ${Math.round(share * 100)}%` : ` Checking ${file.name}…`;
        },
      });
      if (stored.status === "uploaded") {
        // Stored, and checked after the answer (large files): wait for the check's outcome.
        progressText.textContent = ` ${file.name} uploaded; checking it…`;
        stored = await api.waitForProcessing(stored.id, { signal });
      }
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

export async function filePage(fileId, signal) {
  let file = await api.get(`/v1/files/${encodeURIComponent(fileId)}`, { signal });
  heading(file.filename, h("a", { href: "#/files", class: "button" }, "All files"));
  const holder = h("section");
  append(view(), holder);
  if (file.status === "uploaded") {
    const checking = h("p", { class: "hint", role: "status" }, `${file.filename} is being checked…`);
    append(holder, checking);
    file = await api.waitForProcessing(file.id, { signal });
    checking.remove();
  }
  await showFile(holder, file, signal, { title: false });
}

// A file just uploaded or opened: its problems as a table, or its summary, report, token counts and preview.
async function showFile(holder, file, signal, { title = true } = {}) {
  if (file.status === "error") {
    append(holder, title ? h("h2", {}, `${file.filename} was not accepted`) : null, problemsView(file));
    return;
  }
  append(
    holder,
    title ? h("h2", {}, `${file.filename} is ready`) : null,
    stats([
      ["Examples", formatNumber(file.n_examples)],
      ["Format", `${file.format} (${file.container})`],
      ["Task", file.task],
      ["Size", formatBytes(file.bytes)],
      ["File id", file.id],
    ]),
    h("p", {}, h("a", { href: `#/new?file=${encodeURIComponent(file.id)}`, class: "button primary" }, "Fine-tune on this file")),
  );
  append(holder, reportSection(file));
  if (file.task === "chat") append(holder, await tokensSection(file, signal));
  const preview = h("section", { class: "card", id: "preview", "aria-labelledby": "preview-heading", "aria-busy": "true" }, h("h2", { id: "preview-heading" }, "First examples"));
  append(holder, preview);
  try {
    const rows = await api.get(`/v1/files/${encodeURIComponent(file.id)}/preview?limit=3`, { signal });
    append(preview, h("p", { class: "hint" }, `As Tunery reads them from the ${file.container} file (${file.format}).`), rows.data.map((row, i) => exampleView(row, i + 1)));
  } catch (error) {
    if (!signal.aborted) append(preview, errorBox(error));
  } finally {
    preview.removeAttribute("aria-busy");
  }
}

function problemsView(file) {
  // The API lists the first problems, each with where it is (line, item or row N), the field and the reason.
  const problems = file.problems || [{ line: null, place: null, field: null, reason: file.status_details || "unknown" }];
  const total = file.total_problems ?? problems.length;
  const more = total - problems.length;
  return [
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
              h("td", { class: "num" }, p.line != null ? (p.place && p.place !== "line" ? `${p.place} ${p.line}` : String(p.line)) : "whole file"),
              h("td", {}, p.field ? h("code", {}, p.field) : "—"),
              h("td", {}, p.reason),
            ),
          ),
        ),
      ),
    ),
    more > 0 ? h("p", { class: "hint" }, `…and ${more} more (the first ${problems.length} are shown).`) : null,
  ];
}

// -- preview ----------------------------------------------------------------------------------------

function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((part) => (typeof part === "string" ? part : part?.text ?? JSON.stringify(part))).join("");
  return content == null ? "" : JSON.stringify(content);
}

function turn(role, content, kind = role) {
  return h("div", { class: `turn turn-${kind.replace(/[^a-z]/gi, "")}` }, h("span", { class: "role" }, role), h("p", {}, contentText(content)));
}

function messageTurns(messages, suffix = "") {
  return (messages || []).map((m) => {
    const calls = (m.tool_calls || []).map((c) => `${c.function?.name || "tool"}(${c.function?.arguments || ""})`).join("\n");
    return turn(`${m.role}${suffix}`, m.content != null && m.content !== "" ? m.content : calls, m.role);
  });
}

// One example as the server read it: a conversation, a preference pair (the prompt, then the chosen and
// the rejected reply), a labelled row or a text.
function exampleView(example, number) {
  const body = [];
  if (example.kind === "chat") body.push(messageTurns(example.messages));
  else if (example.kind === "preference") {
    body.push(messageTurns(example.messages), messageTurns(example.chosen, " (chosen)"), (example.rejected || []).map((m) => turn("rejected", m.content)));
  } else if (example.kind === "classification") {
    body.push(turn("text", example.text), h("p", { class: "label" }, "Label: ", h("strong", {}, example.label)));
  } else body.push(turn("text", example.text));
  const fields = Object.entries(example.fields || {});
  return h(
    "article",
    { class: "conversation", "aria-label": `Example ${number}` },
    h("h3", {}, `Example ${number} `, h("span", { class: "muted" }, `(${example.source})`)),
    body,
    fields.length ? h("p", { class: "hint" }, fields.map(([k, v]) => `${k}: ${contentText(v)}`).join(" · ")) : null,
  );
}

// -- report -----------------------------------------------------------------------------------------

function lengthChart(chars) {
  const histogram = chars.histogram;
  if (histogram?.counts?.length) {
    const edges = histogram.edges;
    const items = histogram.counts.map((n, i) => [`${formatNumber(edges[i])}–${formatNumber(edges[i + 1])}`, n]);
    return bars("Length distribution (characters per example)", items, { id: "length-chart", unit: " ex." });
  }
  return bars("Characters per example", [["median", chars.p50], ["95th percentile", chars.p95], ["longest", chars.max]], { id: "length-chart" });
}

function reportSection(file) {
  const report = file.report || {};
  const s = report.stats || {};
  const section = h("section", { class: "card report", id: "report", "aria-labelledby": "report-heading" }, h("h2", { id: "report-heading" }, "Quality and personal data"));
  const charts = h("div", { class: "chart-row" });
  if (s.characters) charts.append(lengthChart(s.characters));
  if (s.exact_duplicates != null) {
    const exact = s.exact_duplicates || 0;
    const near = s.near_duplicates || 0;
    const items = [["unique", Math.max(0, (file.n_examples || 0) - exact - near)], ["exact duplicates", exact]];
    if (s.near_duplicates != null) items.push([`near duplicates (≥ ${s.similarity_threshold})`, near]);
    charts.append(bars("Duplicates", items, { id: "duplicates-chart", unit: " ex." }));
  }
  if (s.labels && Object.keys(s.labels).length) {
    charts.append(bars("Label balance", Object.entries(s.labels), { id: "labels-chart", unit: " ex." }));
  }
  const pii = report.personal_data?.counts || {};
  const kinds = Object.entries(pii);
  if (kinds.length) charts.append(bars("Personal data found", kinds, { id: "pii-chart" }));
  if (report.suggested_split) {
    charts.append(bars(`Suggested split (${report.suggested_split.rule})`, [["training", report.suggested_split.train], ["validation", report.suggested_split.validation]], { unit: " examples" }));
  }
  append(section, charts);
  const facts = [];
  if (s.exact_duplicates != null) facts.push(["Exact duplicates", formatNumber(s.exact_duplicates)]);
  if (s.near_duplicates != null) facts.push(["Near duplicates", `${formatNumber(s.near_duplicates)} (similarity ≥ ${s.similarity_threshold})`]);
  if (s.empty_turns != null) facts.push(["Empty turns", formatNumber(s.empty_turns)]);
  if (s.characters) facts.push(["Characters per example", `median ${formatNumber(s.characters.p50)}, p95 ${formatNumber(s.characters.p95)}, max ${formatNumber(s.characters.max)}`]);
  facts.push(["Personal data", kinds.length ? kinds.map(([k, n]) => `${k}: ${n}`).join(", ") : "none found"]);
  append(section, stats(facts));
  if (kinds.length) {
    const seen = report.personal_data.first_seen || {};
    append(
      section,
      h(
        "p",
        { class: "notice", id: "pii-note" },
        "Found at: ",
        kinds.map(([k]) => `${k} (${(seen[k] || []).join(", ")})`).join("; "),
        ". A job's data policy decides what happens to it: warn (train as is), redact (replaced by [REDACTED:kind] before training) or reject (the job fails).",
      ),
    );
  }
  return section;
}

// Token counts with a chosen model's tokenizer and chat template (an evaluator worker counts them).
async function tokensSection(file, signal) {
  const models = await api.get("/v1/models", { signal });
  const chat = models.data.filter((m) => !m.fine_tuned && (m.tasks || []).includes("supervised"));
  const select = h("select", { id: "tokens-model", name: "model" }, chat.map((m) => h("option", { value: m.id }, m.id)));
  const button = h("button", { type: "submit" }, "Count tokens");
  const out = h("div", { id: "tokens-result", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "inline-form", novalidate: true },
    h("div", { class: "field" }, h("label", { for: "tokens-model" }, "Model"), select),
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    replace(out, h("p", { class: "hint" }, "Counting… (an evaluator tokenizes every row with the model's tokenizer)"));
    try {
      const r = await api.get(`/v1/files/${encodeURIComponent(file.id)}/report?model=${encodeURIComponent(select.value)}`, { signal });
      const t = r.tokens || {};
      replace(
        out,
        stats([
          ["Tokens in all", formatNumber(t.total)],
          ["Per example", `median ${formatNumber(t.p50)}, p95 ${formatNumber(t.p95)}, max ${formatNumber(t.max)}`],
          [`Longer than ${formatNumber(r.max_seq_length)} (cut)`, formatNumber(t.truncated_examples)],
          ["Left with nothing to train on", formatNumber(t.skipped_examples ?? 0)],
        ], { id: "tokens-stats" }),
        (r.notes || []).map((note) => h("p", { class: "notice" }, note)),
      );
    } catch (error) {
      if (!signal.aborted) replace(out, errorBox(error));
    } finally {
      button.disabled = false;
    }
  });
  return h(
    "section",
    { class: "card", id: "tokens", "aria-labelledby": "tokens-heading" },
    h("h2", { id: "tokens-heading" }, "Token counts"),
    h("p", { class: "hint" }, "Every row tokenized with the model's chat template, as a job on it would train."),
    chat.length ? [form, out] : h("p", { class: "hint" }, "No chat model in the catalog."),
  );
}
