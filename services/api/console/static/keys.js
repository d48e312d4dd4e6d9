// The API keys page (admin keys only; the API answers 403 to a member key, and the page says so): the
// organization's keys, a form making a new one (its secret shown once), and revoking one.
import * as api from "./api.js";
import { append, errorBox, h, heading, replace, tableWrap, view } from "./dom.js";
import { formatTime } from "./data.js";

export async function keysPage(signal) {
  heading("API keys");
  const holder = h("div");
  append(view(), holder);
  let keys;
  try {
    keys = await api.get("/v1/keys", { signal });
  } catch (error) {
    if (error.status === 403) {
      append(holder, h("p", { class: "notice", id: "keys-forbidden" }, "Managing keys needs an admin API key; this one is a member key. Ask an admin of your organization for a key."));
      return;
    }
    throw error;
  }
  const name = h("input", { id: "key-name", name: "name", type: "text", maxlength: "64", autocomplete: "off", required: true, "aria-describedby": "key-name-hint" });
  const role = h("select", { id: "key-role", name: "role" }, h("option", { value: "member" }, "member: jobs, files, models, evaluations"), h("option", { value: "admin" }, "admin: also keys, and deleting models"));
  const message = h("div", { role: "alert" });
  const created = h("div", { id: "key-created", "aria-live": "polite" });
  const button = h("button", { type: "submit", class: "primary" }, "Create key");
  const form = h(
    "form",
    { class: "card", id: "key-form", novalidate: true },
    h("h2", {}, "New key"),
    h("div", { class: "grid" },
      h("div", { class: "field" }, h("label", { for: "key-name" }, "Name"), name, h("p", { class: "hint", id: "key-name-hint" }, "Who or what uses it, e.g. ci-pipeline.")),
      h("div", { class: "field" }, h("label", { for: "key-role" }, "Role"), role),
    ),
    message,
    button,
  );
  const table = h("div");
  append(holder, form, created, table);

  const render = () => {
    replace(
      table,
      tableWrap(
        h(
          "table",
          { id: "keys-table", class: "stack" },
          h("caption", {}, "Keys of your organization"),
          h("thead", {}, h("tr", {}, ["Key", "Name", "Role", "Created", "Status", h("span", { class: "visually-hidden" }, "Actions")].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, keys.data.map(row)),
        ),
      ),
    );
  };
  const row = (key) => {
    const actions = h("td", { "data-label": "Actions" });
    const revoke = () => {
      replace(
        actions,
        h("span", { class: "confirm-text" }, "Revoke it? Whoever uses it is refused from now on. "),
        h("button", { type: "button", class: "danger", onclick: () => doRevoke(key) }, `Yes, revoke ${key.id}`),
        " ",
        h("button", { type: "button", onclick: render }, "Keep it"),
      );
      actions.querySelector(".danger").focus();
    };
    if (key.revoked_at == null && !key.current) append(actions, h("button", { type: "button", class: "danger", onclick: revoke, "aria-label": `Revoke ${key.id}` }, "Revoke"));
    else if (key.current) append(actions, h("span", { class: "muted" }, "the key you signed in with"));
    return h(
      "tr",
      { dataset: { key: key.id } },
      h("th", { scope: "row", "data-label": "Key" }, h("code", {}, key.id)),
      h("td", { "data-label": "Name" }, key.name || "—"),
      h("td", { "data-label": "Role" }, key.role),
      h("td", { "data-label": "Created" }, formatTime(key.created_at)),
      h("td", { "data-label": "Status" }, key.revoked_at ? h("span", { class: "badge badge-cancelled" }, `revoked ${formatTime(key.revoked_at)}`) : h("span", { class: "badge badge-succeeded" }, "active")),
      actions,
    );
  };
  const doRevoke = async (key) => {
    try {
      const revoked = await api.post(`/v1/keys/${encodeURIComponent(key.id)}/revoke`, undefined, { signal });
      keys.data = keys.data.map((k) => (k.id === revoked.id ? revoked : k));
      render();
      replace(created, h("p", { class: "notice notice-ok", role: "status" }, `Key ${revoked.id} revoked.`));
    } catch (error) {
      replace(created, errorBox(error));
    }
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(message);
    if (!name.value.trim()) {
      append(message, h("p", { class: "notice notice-error" }, "Give the key a name."));
      name.focus();
      return;
    }
    button.disabled = true;
    try {
      const key = await api.post("/v1/keys", { name: name.value.trim(), role: role.value }, { signal });
      keys.data.push(key);
      render();
      const secret = h("input", { id: "new-key", type: "text", readonly: true, value: key.key, spellcheck: "false", "aria-describedby": "new-key-hint" });
      replace(
        created,
        h(
          "div",
          { class: "notice notice-ok" },
          h("label", { for: "new-key" }, `Key ${key.id} (${key.role}) created`),
          secret,
          h("p", { class: "hint", id: "new-key-hint" }, "Copy it now: it is shown only this once (Tunery keeps only a hash)."),
        ),
      );
      secret.select();
      name.value = "";
    } catch (error) {
      append(message, errorBox(error));
    } finally {
      button.disabled = false;
    }
  });
  render();
}
