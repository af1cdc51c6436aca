// Sign-in: a tenant token, checked against the API, kept in sessionStorage for this tab only.

import { token } from "./api.js";
import { h } from "./dom.js";

export function render(view, onSignedIn) {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, spellcheck: "false",
    "aria-describedby": "token-help signin-error" });
  const error = h("p", { id: "signin-error", class: "error", role: "alert" });
  const form = h("form", { class: "card signin", onsubmit: async (event) => {
    event.preventDefault();
    error.textContent = "";
    const value = input.value.trim();
    try {
      // A plain fetch: a refused token must leave this form (and its message) in place.
      const res = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${value}` } });
      if (res.ok) { token.set(value); onSignedIn(); return; }
      error.textContent = res.status === 401 ? "That token is not valid for this service." : `Could not sign in: HTTP ${res.status}`;
    } catch (err) {
      error.textContent = `Could not sign in: ${err.message}`;
    }
  } },
  h("h1", { text: "Sign in" }),
  h("label", { for: "token", text: "Tenant API token" }), input,
  h("p", { id: "token-help", class: "muted", text: "The token your operator gave you (LATHE_TOKEN). It is kept in this tab only and sent as a bearer header; closing the tab forgets it." }),
  error,
  h("button", { type: "submit", class: "primary", text: "Sign in" }));
  view.append(form);
  input.focus();
}
