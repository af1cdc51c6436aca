// One job: phase timeline, live progress (the job's event stream), loss and learning-rate curves,
// attempts, log tail, and once it has outputs: samples, grids, plots, shrink report, metadata
// summary and downloads. Every box that fills in live has its size reserved, so nothing moves.

import { api, outputUrl, stream } from "./api.js";
import { lineChart } from "./chart.js";
import { clear, confirmDialog, fmtBytes, fmtDuration, fmtNum, fmtTime, h, setText } from "./dom.js";

const PHASES = ["queued", "preparing", "training", "shrinking", "uploading"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATS = [["step", "Step"], ["epoch", "Epoch"], ["loss", "Loss"], ["avg_loss", "Avg loss"], ["lr", "LR"],
  ["it_per_s", "it/s"], ["eta_s", "ETA"]];

export function render(view, jobId) {
  document.title = "Job · Lathe";
  const enc = encodeURIComponent(jobId);
  const el = {
    name: h("h1", { class: "job-name" }), id: h("p", { class: "mono muted small", text: jobId }),
    phase: h("span", { class: "phase" }), timeline: h("ol", { class: "timeline", "aria-label": "Phases" }),
    bar: h("progress", { max: 1, value: 0, "aria-label": "Progress" }),
    stats: {}, error: h("div", { class: "error-box", role: "alert", hidden: true }),
    attempts: h("tbody"), log: h("pre", { class: "log", tabindex: "0", "aria-label": "Log tail" }),
    results: h("section", { class: "results", "aria-label": "Results" }),
    cancel: h("button", { type: "button", text: "Cancel job", class: "danger", hidden: true }),
    remove: h("button", { type: "button", text: "Delete job", class: "danger", hidden: true }),
  };
  const loss = lineChart("Loss");
  const lr = lineChart("Learning rate");
  for (const phase of [...PHASES, "done"]) el.timeline.append(h("li", { "data-phase": phase, text: phase }));
  const statBoxes = STATS.map(([key, label]) => {
    el.stats[key] = h("dd", { class: "num", text: "—" });
    return h("div", { class: "stat" }, h("dt", { text: label }), el.stats[key]);
  });
  let stopped = false, live = null, timers = [], job = null, lastMetrics = 0, resultsShown = false;

  // Actions start at the left, after a fixed-width phase badge: a changing phase never moves them.
  const head = h("div", { class: "job-head" },
    el.name, el.id,
    h("div", { class: "row" }, el.phase,
      h("a", { class: "button", href: `#/compare/${enc}/`, text: "Compare…", id: "compare-link" }), el.cancel, el.remove));

  el.cancel.addEventListener("click", () => confirmDialog("Cancel this job? The trainer checkpoints and stops.", async () => {
    try { await api(`/v1/jobs/${enc}/cancel`, { method: "POST" }); } catch (err) { alertText(err.message); }
  }));
  el.remove.addEventListener("click", () => confirmDialog("Delete this job and all its outputs? This cannot be undone.", async () => {
    try { await api(`/v1/jobs/${enc}`, { method: "DELETE" }); location.hash = "#/"; } catch (err) { alertText(err.message); }
  }));

  function alertText(message) { el.error.hidden = false; setText(el.error, message); }

  function showJob(j) {
    job = j;
    document.title = `${j.name || j.id} · Lathe`;
    setText(el.name, j.name || "(unnamed)");
    setText(el.phase, j.phase + (j.cancel_requested && !TERMINAL.has(j.phase) ? " (cancelling)" : ""));
    el.phase.className = `phase ${j.phase}`;
    markTimeline(j.phase, reachedBefore(j));
    showProgress(j.progress, j.phase);
    el.cancel.hidden = TERMINAL.has(j.phase);
    el.remove.hidden = !TERMINAL.has(j.phase);
    if (j.error) alertText(`${j.error.reason}: ${j.error.message}`);
    clear(el.attempts);
    for (const a of j.attempts) {
      el.attempts.append(h("tr", {},
        h("td", { class: "num", text: a.attempt }), h("td", { class: "num", text: fmtTime(a.launched_at) }),
        h("td", { class: "num", text: fmtTime(a.ended_at) }), h("td", { text: a.reason || "" }),
        h("td", { class: "num", text: a.exit_code ?? "" })));
    }
    if (!j.attempts.length) el.attempts.append(h("tr", {}, h("td", { colspan: 5, class: "muted", text: "not launched yet" })));
  }

  // A job that ended early did not pass every phase: the record keeps no phase history, so mark what
  // the record shows it reached (launched: preparing; a step done: training), not the whole row.
  function reachedBefore(j) {
    if (!TERMINAL.has(j.phase) || j.phase === "succeeded") return PHASES.length;
    if ((j.progress?.step || 0) > 0) return PHASES.indexOf("training") + 1;
    return j.attempts.length ? PHASES.indexOf("preparing") + 1 : 1;
  }

  function markTimeline(phase, reached) {
    const at = TERMINAL.has(phase) ? PHASES.length : PHASES.indexOf(phase);
    el.timeline.querySelectorAll("li").forEach((li, i) => {
      li.className = i < Math.min(at, reached) ? "past" : i === at ? `current ${phase}` : "";
      if (i === PHASES.length) setText(li, TERMINAL.has(phase) ? phase : "done");
      if (i === at) li.setAttribute("aria-current", "step"); else li.removeAttribute("aria-current");
    });
  }

  function showProgress(p, phase) {
    if (!p) return;
    el.bar.value = p.total_steps ? p.step / p.total_steps : phase === "succeeded" ? 1 : 0;
    setText(el.stats.step, p.total_steps ? `${p.step}/${p.total_steps}` : "—");
    setText(el.stats.epoch, p.total_epochs ? `${p.epoch}/${p.total_epochs}` : p.epoch || "—");
    setText(el.stats.loss, fmtNum(p.loss));
    setText(el.stats.avg_loss, fmtNum(p.avg_loss));
    setText(el.stats.lr, fmtNum(p.lr));
    setText(el.stats.it_per_s, fmtNum(p.it_per_s, 2));
    setText(el.stats.eta_s, TERMINAL.has(phase) ? "—" : fmtDuration(p.eta_s));
  }

  async function loadMetrics() {
    lastMetrics = Date.now();
    try {
      const m = await api(`/v1/jobs/${enc}/metrics`);
      loss.update([{ label: "loss", points: m.points.map((p) => [p.step, p.loss]) }]);
      lr.update([{ label: "learning rate", points: m.points.map((p) => [p.step, p.lr]) }]);
    } catch { /* shown on the next refresh */ }
  }

  async function loadLog() {
    try {
      const text = await api(`/v1/jobs/${enc}/logs?tail=200`);
      const atEnd = el.log.scrollTop + el.log.clientHeight >= el.log.scrollHeight - 4;
      setText(el.log, text || "(no log lines yet)");
      if (atEnd) el.log.scrollTop = el.log.scrollHeight;
    } catch { /* kept */ }
  }

  async function refresh() {
    const j = await api(`/v1/jobs/${enc}`);
    if (stopped) return;
    showJob(j);
    if (TERMINAL.has(j.phase) && !resultsShown) {
      resultsShown = true;
      live?.stop();
      await Promise.all([loadMetrics(), loadLog(), showResults(el.results, jobId, j)]);
    }
  }

  function onEvent(type, e) {
    if (!job) return;
    if (e.phase !== job.phase || TERMINAL.has(e.phase)) { refresh(); return; }
    showProgress(e.progress, e.phase);
    if (Date.now() - lastMetrics > 2000) loadMetrics();
  }

  api(`/v1/jobs/${enc}`).then((j) => {
    if (stopped) return;
    view.append(head, el.timeline,
      h("section", { class: "card live", "aria-label": "Progress" }, el.bar, h("dl", { class: "stats" }, ...statBoxes)),
      el.error,
      h("div", { class: "charts" }, loss, lr),
      h("section", { class: "card" }, h("h2", { text: "Log" }), el.log),
      h("section", { class: "card" }, h("h2", { text: "Attempts" }),
        h("table", { class: "attempts" }, h("thead", {}, h("tr", {}, ...["#", "Launched", "Ended", "Reason", "Exit code"].map((t) => h("th", { scope: "col", text: t })))), el.attempts)),
      el.results);
    showJob(j);
    loadMetrics();
    loadLog();
    if (TERMINAL.has(j.phase)) { resultsShown = true; showResults(el.results, jobId, j); return; }
    live = stream(`/v1/jobs/${enc}/events`, onEvent, (e) => TERMINAL.has(e.phase));
    timers.push(setInterval(loadLog, 3000));
    timers.push(setInterval(() => { if (job && !TERMINAL.has(job.phase)) refresh().catch(() => {}); }, 5000));
  }).catch((err) => {
    if (stopped) return;
    document.title = "Not found · Lathe";
    view.append(h("div", { class: "card notfound" },
      h("h1", { text: err.status === 404 ? "Job not found" : "Could not load the job" }),
      h("p", { text: err.status === 404 ? `There is no job ${jobId} for this tenant.` : err.message }),
      h("a", { href: "#/", text: "Back to the jobs" })));
  });

  return () => { stopped = true; live?.stop(); timers.forEach(clearInterval); };
}

async function showResults(section, jobId, j) {
  const enc = encodeURIComponent(jobId);
  let d;
  try { d = await api(`/v1/jobs/${enc}/details`); } catch (err) { section.append(h("p", { class: "error", text: err.message })); return; }
  clear(section);
  if (d.samples.length) section.append(h("section", { class: "card" }, h("h2", { text: "Samples" }), gallery(jobId, d.samples)));
  const images = [...d.grids.map((n) => ["Grid", n]), ...d.plots.map((n) => ["Plot", n])];
  if (images.length) {
    section.append(h("section", { class: "card" }, h("h2", { text: "Grids and plots" }),
      h("div", { class: "figures" }, ...images.map(([label, name]) => figure(jobId, name, `${label}: ${name}`, "wide")))));
  }
  if (d.shrink_report) {
    const { timings_s: _, ...report } = d.shrink_report;  // the timings are for benchmarks, not for choosing a save
    section.append(h("section", { class: "card", id: "shrink-report" }, h("h2", { text: "Shrink report" }), keyValues(flat(report))));
  }
  section.append(h("section", { class: "card", id: "summary" }, h("h2", { text: "Summary" }), keyValues(Object.entries(d.summary))));
  if (j.outputs.length) section.append(h("section", { class: "card" }, h("h2", { text: "Downloads" }), downloads(jobId, j.outputs)));
}

export function gallery(jobId, samples) {
  const steps = [...new Set(samples.map((s) => s.step))];
  return h("div", { class: "gallery" }, ...steps.map((step) => h("div", { class: "step-row" },
    h("h3", { text: `Step ${step}` }),
    h("div", { class: "thumbs" }, ...samples.filter((s) => s.step === step).map((s) => figure(jobId, s.name, s.prompt ?? `prompt ${s.index}`))))));
}

// An output image; a click opens it at full size. "wide" (grids, plots) is shown at its own aspect.
export function figure(jobId, name, caption, size = "thumb") {
  const img = h("img", { alt: caption, loading: "lazy", "data-name": name });
  const link = h("a", { href: "#", class: "zoom", title: "Open at full size" }, img);
  outputUrl(jobId, name).then((url) => { img.src = url; link.href = url; link.target = "_blank"; })
    .catch(() => { img.alt = `${caption} (could not load)`; });
  return h("figure", { class: size }, link, h("figcaption", { text: caption }));
}

// Nested keys as dotted rows; a long list (the per-layer table) as its length, not its content.
function flat(obj, prefix = "") {
  return Object.entries(obj).flatMap(([k, v]) => (v && typeof v === "object" && !Array.isArray(v)
    ? flat(v, `${prefix}${k}.`)
    : [[`${prefix}${k}`, Array.isArray(v) ? (v.length > 8 ? `${v.length} entries` : JSON.stringify(v)) : v]])).slice(0, 60);
}

function keyValues(entries) {
  return h("dl", { class: "kv" }, ...entries.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { class: "mono", text: v ?? "" })]));
}

function downloads(jobId, outputs) {
  const enc = encodeURIComponent(jobId);
  return h("ul", { class: "downloads" }, ...outputs.map((o) => {
    const path = `/v1/jobs/${enc}/files/${o.name.split("/").map(encodeURIComponent).join("/")}`;
    // A presigned URL needs no header: a plain link. Otherwise the bytes come through the API.
    const link = o.url
      ? h("a", { href: o.url, download: o.name.split("/").pop(), rel: "noopener", "data-download": o.name, text: o.name })
      : h("a", { href: "#", "data-download": o.name, "data-api": path, text: o.name, onclick: async (event) => {
        event.preventDefault();
        const res = await api(path, { raw: true });
        const url = URL.createObjectURL(await res.blob());
        const a = h("a", { href: url, download: o.name.split("/").pop() });
        document.body.append(a); a.click(); a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } });
    return h("li", {}, link, h("span", { class: "muted small", text: ` ${o.kind} · ${fmtBytes(o.size)} · sha256 ${o.sha256.slice(0, 12)}…` }));
  }));
}
