// The console's only way to the server: the public REST API, with the API key the user signed in with.
// The key lives in sessionStorage (gone when the tab closes) and only ever travels in the Authorization
// header, never in a URL.

const KEY_NAME = "tunery.apiKey";

export class ApiError extends Error {
  constructor(status, message, { code = null, param = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function signIn(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function signOut() {
  sessionStorage.removeItem(KEY_NAME);
}

// Called on every 401 so the app can send the user back to the sign-in page.
let onUnauthorized = () => {};
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

function headers(key, extra = {}) {
  return { Authorization: `Bearer ${key}`, ...extra };
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let detail = {};
  try {
    const body = await response.json();
    if (body && body.error) {
      detail = body.error;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, { code: detail.code, param: detail.param });
}

// A JSON request. `key` overrides the stored key (used to check a key before keeping it).
export async function request(method, path, { body, key = apiKey(), signal } = {}) {
  const init = { method, headers: headers(key), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && key === apiKey()) onUnauthorized(error);
    throw error;
  }
  return response.json();
}

export const get = (path, options) => request("GET", path, options);
export const post = (path, body, options) => request("POST", path, { ...options, body });
export const del = (path, options) => request("DELETE", path, options);

// The raw body of a download (a file's content, an artifact archive) as a Response.
export async function download(path, { signal } = {}) {
  const response = await fetch(path, { headers: headers(apiKey()), signal });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// Files up to this size go in one request (POST /v1/files); larger ones through the Uploads API in parts
// of this size, so no single request is large (the server's part limit is 64 MiB by default).
export const PART_BYTES = 16_000_000;

// Upload a file with progress (onProgress(share) from 0 to 1); resolves with the file object. Small files
// go in one multipart POST /v1/files; large ones through POST /v1/uploads, its parts, and complete.
export async function uploadFile(file, { purpose = "fine-tune", onProgress = () => {} } = {}) {
  if (file.size <= PART_BYTES) return sendForm("/v1/files", { purpose, file }, onProgress);
  const upload = await post("/v1/uploads", { filename: file.name, purpose, bytes: file.size, mime_type: file.type || "application/octet-stream" });
  const partIds = [];
  try {
    for (let start = 0; start < file.size; start += PART_BYTES) {
      const part = file.slice(start, start + PART_BYTES);
      const sent = await sendForm(`/v1/uploads/${encodeURIComponent(upload.id)}/parts`, { data: part }, (share) =>
        onProgress((start + share * part.size) / file.size),
      );
      partIds.push(sent.id);
    }
    // Completing assembles the file (and validates it, if small enough): the bar stays full meanwhile.
    const done = await post(`/v1/uploads/${encodeURIComponent(upload.id)}/complete`, { part_ids: partIds });
    return done.file;
  } catch (error) {
    await post(`/v1/uploads/${encodeURIComponent(upload.id)}/cancel`).catch(() => {});
    throw error;
  }
}

// A file larger than the server's TUNERY_SYNC_VALIDATION_BYTES (8 MiB by default) is answered `uploaded`
// once stored and validated after: poll it until it is `processed` or `error`, as the openai SDK's
// files.wait_for_processing does. Resolves with the file object then.
export async function waitForProcessing(fileId, { signal, interval = 1000 } = {}) {
  for (;;) {
    const file = await get(`/v1/files/${encodeURIComponent(fileId)}`, { signal });
    if (file.status !== "uploaded") return file;
    await new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, interval);
      signal?.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(signal.reason);
      }, { once: true });
    });
  }
}

// A multipart POST with upload progress: XMLHttpRequest reports it, fetch() does not. Resolves with the
// JSON answer, rejects with an ApiError.
function sendForm(path, fields, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(body);
        return;
      }
      const detail = (body && body.error) || {};
      const error = new ApiError(xhr.status, detail.message || `${xhr.status} ${xhr.statusText}`, detail);
      if (xhr.status === 401) onUnauthorized(error);
      reject(error);
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the upload failed: the server could not be reached")));
    const form = new FormData();
    for (const [name, value] of Object.entries(fields)) {
      if (value instanceof File) form.append(name, value, value.name);
      else form.append(name, value);
    }
    xhr.send(form);
  });
}

// Follow a job's server-sent events. EventSource cannot send an Authorization header, so this reads the
// stream with fetch(). Calls onEvent(event) for every job event (oldest first) and onEnd(data) once
// the job has finished; reconnects from the last event id if the connection drops. Stop with
// signal (an AbortSignal).
export async function followEvents(jobId, { onEvent, onEnd = () => {}, signal }) {
  let lastId = null;
  let failures = 0;
  while (!signal.aborted) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (lastId) extra["Last-Event-ID"] = lastId;
      const response = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`, {
        headers: headers(apiKey(), extra),
        signal,
      });
      if (!response.ok) {
        const error = await errorOf(response);
        if (response.status === 401) onUnauthorized(error);
        throw error;
      }
      failures = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const message = parseSse(block);
          if (!message) continue;
          if (message.event === "end") {
            onEnd(JSON.parse(message.data || "{}"));
            return;
          }
          if (message.id) lastId = message.id;
          onEvent(JSON.parse(message.data));
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status >= 400 && error.status < 500) throw error;
      failures += 1;
    }
    // The connection closed without `event: end`: reconnect after a pause (longer after each failure).
    await new Promise((resolve) => setTimeout(resolve, Math.min(1000 * 2 ** failures, 15000)));
  }
}

function parseSse(block) {
  const message = { event: "message", data: "", id: null };
  let seen = false;
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments are keep-alives
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") message.data += (message.data ? "\n" : "") + value;
    else if (field === "event") message.event = value;
    else if (field === "id") message.id = value;
    else continue;
    seen = true;
  }
  return seen ? message : null;
}
