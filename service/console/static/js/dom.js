// Building DOM nodes without HTML strings: every text goes in as textContent, so a job name, prompt
// or log line is shown as text whatever it holds.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElementNS(tag.startsWith("svg:") ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag.replace(/^svg:/, ""));
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = String(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function setText(el, value) {
  const text = value === null || value === undefined ? "" : String(value);
  if (el.textContent !== text) el.textContent = text;
}

export function fmtTime(unix) {
  if (!unix) return "—";
  const d = new Date(unix * 1000);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function fmtNum(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  return Math.abs(value) < 1e-3 && value !== 0 ? value.toExponential(2) : Number(value).toFixed(digits);
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

export function confirmDialog(message, action) {
  // A <dialog> rather than window.confirm: it is styled, keyboard-usable and testable.
  const dialog = h("dialog", { class: "confirm", "aria-label": "Confirm" },
    h("p", { text: message }),
    h("div", { class: "row" },
      h("button", { type: "button", class: "danger", "data-confirm": "yes", onclick: () => { dialog.close(); dialog.remove(); action(); } }, "Yes"),
      h("button", { type: "button", "data-confirm": "no", onclick: () => { dialog.close(); dialog.remove(); } }, "No")));
  document.body.append(dialog);
  dialog.showModal();
}
