// The API from the browser: the tenant token lives in sessionStorage only (never a URL or cookie) and
// goes out as the bearer header; Server-Sent Events are read from a streamed fetch, because
// EventSource cannot send that header.

const TOKEN_KEY = "lathe.token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

export async function api(path, { method = "GET", body, signal, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${token.get() || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401) {
    token.clear();
    window.dispatchEvent(new Event("lathe:signedout"));
  }
  if (!res.ok) {
    let problem = null;
    try { problem = await res.json(); } catch { /* not JSON */ }
    throw new ApiError(res.status, problem);
  }
  if (raw) return res;
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") || "";
  return type.includes("json") ? res.json() : res.text();
}

// A job's output as an object URL (the image bytes come through the API with the bearer header).
const blobCache = new Map();
export async function outputUrl(jobId, name) {
  const key = `${jobId}/${name}`;
  if (!blobCache.has(key)) {
    blobCache.set(key, api(`/v1/jobs/${encodeURIComponent(jobId)}/files/${name.split("/").map(encodeURIComponent).join("/")}`, { raw: true })
      .then((res) => res.blob()).then((blob) => URL.createObjectURL(blob))
      .catch((err) => { blobCache.delete(key); throw err; }));
  }
  return blobCache.get(key);
}

// Reads an SSE endpoint; calls onEvent(type, data) per event. Reconnects (with Last-Event-ID) until
// stop() is called or `done(data)` says the stream's last event was final.
export function stream(path, onEvent, done) {
  const controller = new AbortController();
  let lastId = null;
  let stopped = false;
  async function once() {
    const headers = { Authorization: `Bearer ${token.get() || ""}`, Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    const res = await fetch(path, { headers, signal: controller.signal });
    if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let finished = false;
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let type = "message", data = "", id = null;
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const [field, ...rest] = line.split(":");
          const text = rest.join(":").replace(/^ /, "");
          if (field === "event") type = text;
          else if (field === "data") data += (data ? "\n" : "") + text;
          else if (field === "id") id = text;
        }
        if (id !== null) lastId = id;
        if (!data) continue;
        const parsed = JSON.parse(data);
        onEvent(type, parsed);
        if (done && done(parsed)) finished = true;
      }
    }
    return finished;
  }
  (async () => {
    while (!stopped) {
      try {
        if (await once()) return;
      } catch (err) {
        if (stopped || (err instanceof ApiError && err.status < 500)) return;
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  })();
  return { stop() { stopped = true; controller.abort(); } };
}
