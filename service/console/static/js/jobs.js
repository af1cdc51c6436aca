// The jobs list: paged with the API's cursor, refreshed every few seconds in place (one request per
// page rather than one event stream per job: browsers allow six connections per origin).

import { api } from "./api.js";
import { clear, fmtDuration, fmtTime, h, setText } from "./dom.js";

const POLL_MS = 2000;
const PAGE = 20;

export function render(view) {
  document.title = "Jobs · Lathe";
  const cursors = [null];  // cursor of each page seen: back is the previous one
  let page = 0;
  const body = h("tbody");
  const status = h("p", { class: "muted status-line", role: "status" });
  const newer = h("button", { type: "button", text: "← Newer", onclick: () => { page -= 1; load(); } });
  const older = h("button", { type: "button", text: "Older →", onclick: () => { page += 1; load(); } });
  const rows = new Map();
  view.append(
    h("div", { class: "head" }, h("h1", { text: "Jobs" }), h("a", { class: "button primary", href: "#/submit", text: "Submit a job" })),
    h("table", { class: "jobs" },
      h("thead", {}, h("tr", {}, ...["Phase", "Name", "Kind", "Progress", "Submitted", "Finished"].map((t) => h("th", { scope: "col", text: t })))),
      body),
    status,
    h("div", { class: "row pager" }, newer, older));

  let timer = null;
  let stopped = false;
  async function load() {
    clearTimeout(timer);
    try {
      const cursor = cursors[page];
      const list = await api(`/v1/jobs?limit=${PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      if (stopped) return;
      cursors[page + 1] = list.next_cursor;
      show(list.items);
      newer.disabled = page === 0;
      older.disabled = !list.next_cursor;
      setText(status, list.items.length ? `Updated ${new Date().toLocaleTimeString()}` : "No jobs yet: submit one to see it here.");
    } catch (err) {
      setText(status, `Could not load the jobs: ${err.message}`);
    }
    if (!stopped) timer = setTimeout(load, POLL_MS);
  }

  function show(items) {
    const ids = items.map((j) => j.id);
    if (ids.join() !== [...rows.keys()].join()) {
      clear(body);
      rows.clear();
      for (const job of items) {
        const row = makeRow(job);
        rows.set(job.id, row);
        body.append(row.tr);
      }
    }
    for (const job of items) rows.get(job.id).update(job);
  }

  load();
  return () => { stopped = true; clearTimeout(timer); };
}

function makeRow(job) {
  const phase = h("span", { class: "phase" });
  const bar = h("progress", { max: 1, value: 0 });
  const steps = h("span", { class: "num" });
  const eta = h("span", { class: "muted num" });
  const submitted = h("td", { class: "num", "data-label": "Submitted" });
  const finished = h("td", { class: "num", "data-label": "Finished" });
  const kind = h("td", { "data-label": "Kind" });
  const name = h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` });
  const tr = h("tr", { "data-job": job.id },
    h("td", { "data-label": "Phase" }, phase),
    h("td", { class: "name", "data-label": "Name" }, h("div", {}, name, h("div", { class: "muted mono small", text: job.id }))),
    kind,
    h("td", { class: "progress", "data-label": "Progress" }, h("div", {}, bar, " ", steps, " ", eta)),
    submitted, finished);
  function update(j) {
    setText(phase, j.phase);
    phase.className = `phase ${j.phase}`;
    setText(name, j.name || "(unnamed)");
    setText(kind, j.kind);
    bar.value = j.total_steps ? j.step / j.total_steps : j.phase === "succeeded" ? 1 : 0;
    setText(steps, j.total_steps ? `${j.step}/${j.total_steps}` : "");
    setText(eta, j.phase === "training" && j.eta_s !== null && j.eta_s !== undefined ? `ETA ${fmtDuration(j.eta_s)}` : "");
    setText(submitted, fmtTime(j.submitted_at));
    setText(finished, fmtTime(j.finished_at));
    if (j.error) tr.title = `${j.error.reason}: ${j.error.message}`;
  }
  return { tr, update };
}
