// Submit: paste or upload a spec (JSON/TOML) or an sd-scripts command line / config (converted on
// the server, its notes shown). The spec is checked as you type (spec checks only, debounced); the
// dataset preflight runs on demand and before submitting. Every problem sits next to its field path.

import { api } from "./api.js";
import { clear, h, setText } from "./dom.js";

const DEBOUNCE_MS = 500;

export function render(view) {
  document.title = "Submit · Lathe";
  const text = h("textarea", { id: "spec-text", rows: 22, spellcheck: "false", "aria-describedby": "spec-help",
    placeholder: '{"version": 1, "name": "my-lora", "model": {"uri": "s3://…"}, "dataset": {"uri": "s3://…"}, …}' });
  const file = h("input", { type: "file", id: "spec-file", accept: ".json,.toml,.sh,.ps1,.bat,.txt" });
  const format = h("select", { id: "spec-format" }, ...[["auto", "Detect"], ["json", "Spec (JSON)"], ["toml", "Spec (TOML)"],
    ["kohya", "sd-scripts command / config"]].map(([v, t]) => h("option", { value: v, text: t })));
  const status = h("p", { id: "check-status", class: "status-line", role: "status" });
  const notes = h("ul", { id: "convert-notes", class: "notes" });
  const fields = h("div", { id: "fields", class: "fields", "aria-label": "Fields and problems" });
  const preflight = h("div", { id: "preflight" });
  let timer = null, seq = 0, spec = null;

  const convertBtn = h("button", { type: "button", text: "Convert to spec", onclick: () => convert(true) });
  const preflightBtn = h("button", { type: "button", text: "Run preflight", onclick: () => check(true) });
  const submitBtn = h("button", { type: "button", class: "primary", id: "submit-job", text: "Submit job", onclick: submitJob });

  view.append(h("h1", { text: "Submit a job" }),
    h("div", { class: "submit" },
      h("section", { class: "card" },
        h("label", { for: "spec-text", text: "Spec, or an sd-scripts command line / config" }), text,
        h("p", { id: "spec-help", class: "muted small", text: "Paste a Lathe spec (JSON or TOML) or an sd-scripts training command; files named in a command are not read by the server: paste their content instead." }),
        h("div", { class: "row" }, h("label", { for: "spec-file", text: "Or upload a file" }), file),
        h("div", { class: "row" }, h("label", { for: "spec-format", text: "Read as" }), format, convertBtn),
        h("div", { class: "row" }, preflightBtn, submitBtn), status, notes),
      h("section", { class: "card" }, h("h2", { text: "Fields" }), fields, preflight)));

  text.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => convert(false), DEBOUNCE_MS); });
  format.addEventListener("change", () => convert(false));
  file.addEventListener("change", async () => {
    if (!file.files.length) return;
    text.value = await file.files[0].text();
    convert(false);
  });

  // Text → spec object (JSON parsed here; TOML and sd-scripts text by the server), then spec checks.
  async function convert(explicit) {
    clearTimeout(timer);  // a pending check of the same text is this one
    const my = ++seq;
    const raw = text.value;
    clear(notes);
    if (!raw.trim()) { spec = null; clear(fields); setText(status, ""); return; }
    let fmt = format.value;
    if (fmt === "auto" && raw.trimStart().startsWith("{")) fmt = "json";
    let obj = null;
    if (fmt === "json") {
      try { obj = JSON.parse(raw); } catch (err) { return showProblems(my, null, [{ path: "(root)", message: `not valid JSON: ${err.message}` }]); }
      if (obj && obj.spec && typeof obj.spec === "object" && !("version" in obj)) obj = obj.spec;
    } else {
      if (fmt === "auto" && !explicit && looksLikeCommand(raw)) {
        status.className = "status-line";
        setText(status, "An sd-scripts command: press “Convert to spec”.");
        return;
      }
      try {
        const res = await api("/v1/specs:convert", { method: "POST", body: { text: raw, format: fmt } });
        if (my !== seq) return;
        obj = res.spec;
        for (const n of res.notes) notes.append(h("li", { text: n }));
        if (res.source === "kohya") { text.value = JSON.stringify(obj, null, 2); format.value = "auto"; }
      } catch (err) { return showProblems(my, null, err.problem.problems || [{ path: "(root)", message: err.message }]); }
    }
    spec = obj;
    await check(false);
  }

  async function check(withPreflight) {
    const my = ++seq;
    if (!spec) { setText(status, "Nothing to check yet."); return false; }
    setText(status, withPreflight ? "Running the dataset preflight…" : "Checking…");
    try {
      const res = await api(`/v1/jobs:validate?preflight=${withPreflight}`, { method: "POST", body: { spec } });
      if (my !== seq) return true;
      showProblems(my, spec, res.warnings || []);
      status.className = "status-line";
      setText(status, withPreflight ? "The spec and the dataset passed the checks." : "The spec passes the checks (dataset preflight not run yet).");
      if (res.preflight) showPreflight(res.preflight);
      return true;
    } catch (err) {
      if (my !== seq) return false;
      showProblems(my, spec, err.problem.problems || [{ path: "(root)", message: err.message }]);
      if (err.problem.preflight) showPreflight(err.problem.preflight);
      return false;
    }
  }

  function showProblems(my, obj, problems) {
    if (my !== seq) return;
    const errors = problems.filter((p) => (p.severity || "error") === "error");
    setText(status, errors.length ? `${errors.length} problem${errors.length > 1 ? "s" : ""}: see the fields` : "");
    status.className = `status-line ${errors.length ? "error" : ""}`;
    renderFields(fields, obj, problems);
  }

  function showPreflight(report) {
    clear(preflight);
    preflight.append(h("h3", { text: "Dataset preflight" }), h("dl", { class: "kv" },
      ...[["images", report.images], ["steps per epoch", report.steps_per_epoch], ["epochs", report.epochs],
        ["total steps", report.total_steps], ["checked", report.checked ? "yes" : "no (could not be inspected here)"]]
        .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })])));
  }

  async function submitJob() {
    submitBtn.disabled = true;
    try {
      if (!spec) await convert(true);
      if (!(await check(true))) return;
      const res = await fetch("/v1/jobs", { method: "POST", headers: {
        Authorization: `Bearer ${sessionStorage.getItem("lathe.token") || ""}`, "Content-Type": "application/json",
        "Idempotency-Key": crypto.randomUUID() }, body: JSON.stringify({ spec }) });
      const body = await res.json();
      if (!res.ok) { showProblems(++seq, spec, body.problems || [{ path: "(root)", message: body.detail || body.title }]); return; }
      location.hash = `#/jobs/${encodeURIComponent(body.id)}`;
    } finally { submitBtn.disabled = false; }
  }
}

function looksLikeCommand(raw) {
  return /(train_network\.py|accelerate\s+launch|--\w+)/.test(raw);
}

// The spec's leaves as `path  value` rows, each problem on the row of its path (a problem on a path
// the spec lacks, e.g. a missing field, gets a row of its own).
export function renderFields(container, obj, problems) {
  clear(container);
  const rows = new Map();
  const add = (path, value) => {
    const row = h("div", { class: "field", "data-path": path }, h("code", { class: "path", text: path }),
      h("span", { class: "value mono", text: value }));
    rows.set(path, row);
    container.append(row);
  };
  if (obj) for (const [path, value] of leaves(obj, "")) add(path, value);
  for (const p of problems) {
    if (!rows.has(p.path)) add(p.path, "");
    const row = rows.get(p.path);
    row.classList.add(p.severity === "warning" ? "has-warning" : "has-error");
    row.append(h("span", { class: `problem ${p.severity || "error"}`, role: p.severity === "warning" ? null : "alert", text: p.message }));
    if (p.severity !== "warning" && row === [...rows.values()].find((r) => r.classList.contains("has-error"))) {
      container.prepend(row);  // the first problem leads, so it is seen without scrolling
    }
  }
}

function leaves(value, path) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    return Object.entries(value).flatMap(([k, v]) => leaves(v, path ? `${path}.${k}` : k));
  }
  if (Array.isArray(value) && value.some((v) => v && typeof v === "object")) {
    return value.flatMap((v, i) => leaves(v, `${path}[${i}]`));
  }
  return [[path, value === null ? "null" : typeof value === "string" ? value : JSON.stringify(value)]];
}
