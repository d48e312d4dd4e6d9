// Reading what the API says about data: a rejected file's problems, the first examples of a file.

// A rejected file's status_details reads "2 problems: line 11: messages[2].role: reason; line 14: …
// (and 3 more)". The API gives the problems only as this sentence, so the table is parsed from it:
// each problem starts with its place (line, item or row N) and, where one is named, its field.
const PLACE = /^(line|item|row) (\d+): /;
const FIELD = /^([A-Za-z_][\w]*(?:\[\d+\])?(?:\.[A-Za-z_][\w]*(?:\[\d+\])?)*): /;

export function parseProblems(details) {
  if (!details) return { problems: [], more: 0, total: 0 };
  let text = details;
  let total = null;
  const head = text.match(/^(\d+) problems?: /);
  if (head) {
    total = Number(head[1]);
    text = text.slice(head[0].length);
  }
  let more = 0;
  const tail = text.match(/ \(and (\d+) more\)$/);
  if (tail) {
    more = Number(tail[1]);
    text = text.slice(0, -tail[0].length);
  }
  const problems = text.split(/; (?=(?:line|item|row) \d+: )/).map((part) => {
    const problem = { place: "", line: null, field: "", reason: part };
    const place = part.match(PLACE);
    if (place) {
      problem.place = place[1];
      problem.line = Number(place[2]);
      problem.reason = part.slice(place[0].length);
    }
    const field = problem.reason.match(FIELD);
    if (field && !/\s/.test(field[1])) {
      problem.field = field[1];
      problem.reason = problem.reason.slice(field[0].length);
    } else {
      const missing = problem.reason.match(/^missing "([^"]+)"/);
      if (missing) problem.field = missing[1];
    }
    return problem;
  });
  return { problems, more, total: total ?? problems.length + more };
}

// One example of any supported format as turns to show: [{role, content}], plus a label or the
// rejected reply where the format has one.
export function asConversation(row) {
  if (!row || typeof row !== "object") return { turns: [{ role: "data", content: JSON.stringify(row) }] };
  const text = (v) => (typeof v === "string" ? v : JSON.stringify(v));
  if (Array.isArray(row.messages)) {
    return { turns: row.messages.map((m) => ({ role: m.role, content: text(m.content ?? "") })) };
  }
  if (Array.isArray(row.conversations)) {
    const roles = { human: "user", gpt: "assistant", system: "system", function_call: "tool call", observation: "tool" };
    return { turns: row.conversations.map((m) => ({ role: roles[m.from] || m.from, content: text(m.value ?? "") })) };
  }
  if (row.input && Array.isArray(row.input.messages) && row.preferred_output) {
    return {
      turns: [
        ...row.input.messages.map((m) => ({ role: m.role, content: text(m.content ?? "") })),
        ...row.preferred_output.map((m) => ({ role: `${m.role} (preferred)`, content: text(m.content ?? "") })),
      ],
      rejected: (row.non_preferred_output || []).map((m) => text(m.content ?? "")).join("\n"),
    };
  }
  if ("chosen" in row && "rejected" in row) {
    const prompt = row.prompt ?? row.instruction ?? row.conversations ?? "";
    return {
      turns: [
        { role: "user", content: text(prompt) },
        { role: "assistant (chosen)", content: text(row.chosen) },
      ],
      rejected: text(row.rejected),
    };
  }
  if ("instruction" in row && "output" in row) {
    const user = row.input ? `${row.instruction}\n\n${row.input}` : row.instruction;
    const turns = [];
    if (row.system) turns.push({ role: "system", content: text(row.system) });
    turns.push({ role: "user", content: text(user) }, { role: "assistant", content: text(row.output) });
    return { turns };
  }
  if ("prompt" in row && "completion" in row) {
    return { turns: [{ role: "prompt", content: text(row.prompt) }, { role: "completion", content: text(row.completion) }] };
  }
  if ("text" in row && "label" in row) {
    return { turns: [{ role: "text", content: text(row.text) }], label: text(row.label) };
  }
  return { turns: [{ role: "data", content: JSON.stringify(row) }] };
}

const PREVIEW_BYTES = 4 * 1024 * 1024;

// The first `n` examples of a stored file (JSONL or a JSON array), read from GET /v1/files/{id}/content.
// JSONL is read only as far as needed. Returns null for containers the preview cannot read.
export async function firstExamples(response, container, n) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    if (container === "jsonl") {
      const rows = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (value) buffer += value;
        let cut;
        while (rows.length < n && (cut = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 1);
          if (line) rows.push(JSON.parse(line));
        }
        if (rows.length >= n) return rows;
        if (done) {
          if (buffer.trim()) rows.push(JSON.parse(buffer));
          return rows.slice(0, n);
        }
      }
    }
    if (container === "json") {
      for (;;) {
        const { value, done } = await reader.read();
        if (value) buffer += value;
        if (done) break;
        if (buffer.length > PREVIEW_BYTES) return null;
      }
      const data = JSON.parse(buffer);
      return (Array.isArray(data) ? data : [data]).slice(0, n);
    }
    return null;
  } finally {
    reader.cancel().catch(() => {});
  }
}

// -- formatting -------------------------------------------------------------------------------------

export function formatTime(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function formatCost(usd) {
  if (usd == null) return "—";
  if (usd === 0) return "$0";
  if (usd < 0.01) return `$${usd.toPrecision(2)}`;
  return `$${usd.toFixed(2)}`;
}

export function formatBytes(n) {
  if (n == null) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

export function formatNumber(n) {
  return n == null ? "—" : Number(n).toLocaleString();
}
