// Two jobs side by side, from the server's diff (GET /v1/jobs/{a}/diff/{b}): spec differences, loss
// curves overlaid, and the samples both jobs rendered at the same step and prompt.

import { api } from "./api.js";
import { lineChart } from "./chart.js";
import { h } from "./dom.js";
import { figure } from "./job.js";

export function render(view, a, b) {
  document.title = "Compare · Lathe";
  const pickA = h("select", { id: "cmp-a", "aria-label": "First job" });
  const pickB = h("select", { id: "cmp-b", "aria-label": "Second job" });
  const out = h("div", { id: "compare-out" });
  view.append(h("h1", { text: "Compare two jobs" }),
    h("form", { class: "card compare-form", onsubmit: (e) => { e.preventDefault(); location.hash = `#/compare/${encodeURIComponent(pickA.value)}/${encodeURIComponent(pickB.value)}`; } },
      h("label", { for: "cmp-a", text: "A" }), pickA, h("label", { for: "cmp-b", text: "B" }), pickB,
      h("button", { type: "submit", class: "primary", text: "Compare" })),
    out);
  api("/v1/jobs?limit=100").then((list) => {
    for (const [select, chosen] of [[pickA, a], [pickB, b]]) {
      for (const j of list.items) select.append(h("option", { value: j.id, selected: j.id === chosen, text: `${j.name || "(unnamed)"} · ${j.phase} · ${j.id}` }));
    }
  }).catch(() => {});
  if (a && b) show(out, a, b);
}

async function show(out, a, b) {
  const ea = encodeURIComponent(a), eb = encodeURIComponent(b);
  let diff;
  try { diff = await api(`/v1/jobs/${ea}/diff/${eb}`); } catch (err) {
    out.append(h("p", { class: "error", role: "alert", text: err.status === 404 ? "Job not found" : err.message }));
    return;
  }
  const changes = [...diff.spec.map((c) => ["spec", c]), ...diff.model.map((c) => ["model", c]), ...diff.versions.map((c) => ["versions", c])];
  if (diff.final_loss) changes.push(["loss", diff.final_loss]);
  out.append(h("section", { class: "card" }, h("h2", { text: "Differences" }),
    changes.length ? h("table", { class: "diff" },
      h("thead", {}, h("tr", {}, ...["Field", "A", "B"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, ...changes.map(([group, c]) => h("tr", {}, h("td", { class: "mono", text: `${group}: ${c.path}` }),
        h("td", { class: "mono", text: JSON.stringify(c.a) }), h("td", { class: "mono", text: JSON.stringify(c.b) })))))
      : h("p", { text: "The specs are the same." }),
    diff.dataset.length ? h("p", { text: `${diff.dataset.length} dataset file(s) differ.` }) : null,
    diff.complete ? null : h("p", { class: "muted", text: "A job has not finished: only the specs were compared." })));
  const chart = lineChart("Loss");
  out.append(h("div", { class: "charts single" }, chart));
  const [ma, mb, da, db] = await Promise.all([`/v1/jobs/${ea}/metrics`, `/v1/jobs/${eb}/metrics`, `/v1/jobs/${ea}/details`, `/v1/jobs/${eb}/details`]
    .map((p) => api(p).catch(() => null)));
  const label = (d, id) => (d && d.spec && d.spec.name) || id;
  chart.update([[ma, da, a], [mb, db, b]].filter(([m]) => m).map(([m, d, id], i) => (
    { label: `${i ? "B" : "A"}: ${label(d, id)}`, points: m.points.map((p) => [p.step, p.loss]) })));
  if (!da || !db) return;
  const key = (s) => `${s.step}/${s.index}`;
  const inB = new Map(db.samples.map((s) => [key(s), s]));
  const pairs = da.samples.filter((s) => inB.has(key(s))).map((s) => [s, inB.get(key(s))]);
  out.append(h("section", { class: "card" }, h("h2", { text: "Samples at the same step" }),
    pairs.length ? h("div", { class: "pairs" }, ...pairs.map(([sa, sb]) => h("div", { class: "pair" },
      h("h3", { text: `Step ${sa.step} · ${sa.prompt ?? `prompt ${sa.index}`}` }),
      h("div", { class: "thumbs" }, figure(a, sa.name, "A"), figure(b, sb.name, "B")))))
      : h("p", { class: "muted", text: "No step and prompt that both jobs sampled." })));
}
