// The console's router: hash routes (#/, #/jobs/<id>, #/submit, #/compare/<a>/<b>) so that every
// page is this one static shell; sign-in first when no token is held.

import { api, token } from "./api.js";
import { clear, setText } from "./dom.js";
import * as signin from "./signin.js";
import * as jobs from "./jobs.js";
import * as job from "./job.js";
import * as submit from "./submit.js";
import * as compare from "./compare.js";

const view = document.getElementById("view");
let cleanup = null;

const ROUTES = [
  [/^#?\/?$/, jobs, () => []],
  [/^#\/jobs\/([^/]+)$/, job, (m) => [decodeURIComponent(m[1])]],
  [/^#\/submit$/, submit, () => []],
  [/^#\/compare(?:\/([^/]+)\/([^/]+))?$/, compare, (m) => [m[1] && decodeURIComponent(m[1]), m[2] && decodeURIComponent(m[2])]],
];

function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  clear(view);
  const signedIn = Boolean(token.get());
  document.getElementById("signout").hidden = !signedIn;
  document.querySelector("header nav").hidden = !signedIn;
  if (!signedIn) {
    document.title = "Sign in · Lathe";
    cleanup = signin.render(view, () => route());
    return;
  }
  const hash = location.hash || "#/";
  for (const [re, page, args] of ROUTES) {
    const m = hash.match(re);
    if (m) {
      cleanup = page.render(view, ...args(m)) || null;
      markNav(hash);
      return;
    }
  }
  setText(view, "No such page.");
}

function markNav(hash) {
  for (const a of document.querySelectorAll("header nav a")) {
    const target = a.getAttribute("href");
    const current = target === "#/" ? hash === "#/" || hash.startsWith("#/jobs/") : hash.startsWith(target);
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
}

document.getElementById("signout").addEventListener("click", () => {
  token.clear();
  location.hash = "#/";
  route();
});
window.addEventListener("lathe:signedout", () => route());
window.addEventListener("hashchange", route);
route();
export { api };
