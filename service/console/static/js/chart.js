// A line chart in SVG, drawn here rather than with a charting library: a loss or learning-rate curve
// needs only axes, a polyline per series and a legend (about eighty lines), it ships no third-party
// code, and the chart box has a fixed aspect ratio so a redraw never moves the page.

import { clear, h } from "./dom.js";

const W = 600, H = 220, PAD = { left: 68, right: 12, top: 12, bottom: 28 };

export function lineChart(title) {
  const svg = h("svg:svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  const legend = h("ul", { class: "legend" });
  const figure = h("figure", { class: "chart-box" }, h("figcaption", { text: title }), svg, legend);
  figure.update = (series) => draw(svg, legend, series, title);
  draw(svg, legend, [], title);
  return figure;
}

function draw(svg, legend, series, title) {
  clear(svg);
  clear(legend);
  const all = series.flatMap((s) => s.points).filter((p) => p[1] !== null && isFinite(p[1]));
  svg.dataset.points = String(all.length);
  if (!all.length) {
    svg.append(h("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty", text: `no ${title.toLowerCase()} yet` }));
    return;
  }
  let [x0, x1] = extent(all.map((p) => p[0]));
  let [y0, y1] = extent(all.map((p) => p[1]));
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  for (const t of ticks(y0, y1, 4)) {
    svg.append(h("svg:line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.append(h("svg:text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick", text: fmtTick(t) }));
  }
  for (const t of ticks(x0, x1, 5)) {
    svg.append(h("svg:text", { x: sx(t), y: H - 8, "text-anchor": "middle", class: "tick", text: fmtTick(t) }));
  }
  svg.append(h("svg:line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom, class: "axis" }));
  svg.append(h("svg:line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom, class: "axis" }));
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => p[1] !== null && isFinite(p[1]));
    const line = h("svg:polyline", { class: `series s${i}`, points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") });
    line.dataset.points = String(pts.length);
    svg.append(line);
    if (pts.length === 1) svg.append(h("svg:circle", { class: `series s${i}`, cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3 }));
    legend.append(h("li", { class: `s${i}`, text: s.label }));
  });
}

function extent(values) {
  return [Math.min(...values), Math.max(...values)];
}

function ticks(lo, hi, n) {
  const step = niceStep((hi - lo) / n);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

function niceStep(raw) {
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

function fmtTick(t) {
  const a = Math.abs(t);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? t.toExponential(2).replace(/\.?0+e/, "e") : String(+t.toPrecision(4));
}
