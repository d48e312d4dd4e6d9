// DOM helpers shared by the console's pages.

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value == null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "value" || name === "checked") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function errorBox(error) {
  const text = error instanceof Error ? error.message : String(error);
  return h("p", { class: "notice notice-error", role: "alert" }, text);
}

export function tableWrap(table) {
  // Wide tables scroll sideways on narrow screens instead of widening the page.
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": table.caption?.textContent || "table" }, table);
}

// The page's polite live region: tells screen readers what changed.
const announcer = () => document.getElementById("announcer");
export function announce(text) {
  announcer().textContent = text;
}

export const view = () => document.getElementById("view");

// A page's heading. Focus moves to each new page's heading, so keyboard and screen-reader users land on it.
export function heading(text, ...extra) {
  const h1 = h("h1", { tabindex: "-1" }, text);
  document.title = `${text} · Tunery`;
  const header = h("div", { class: "page-header" }, h1, ...extra);
  append(view(), header);
  h1.focus({ preventScroll: true });
  return header;
}

// Terms and their values as a grid.
export function stats(items, props = {}) {
  return h("dl", { class: "stats", ...props }, items.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
}

// A small bar chart in HTML, readable as a list by screen readers: each bar's length is its share of the
// largest value. Widths are set through the CSSOM, which the Content-Security-Policy allows (style
// attributes it does not).
export function bars(title, items, { unit = "", id = null, format = (v) => Number(v).toLocaleString() } = {}) {
  const max = Math.max(...items.map(([, v]) => v), 1);
  return h(
    "figure",
    { class: "bars", id },
    h("figcaption", {}, title),
    h(
      "dl",
      {},
      items.map(([label, value]) => {
        const bar = h("span", { class: "bar" });
        bar.style.width = `${Math.max(1, (100 * value) / max)}%`;
        return h("div", { class: "bar-row" }, h("dt", {}, label), h("dd", {}, h("span", { class: "bar-track" }, bar), h("span", { class: "bar-value" }, `${format(value)}${unit}`)));
      }),
    ),
  );
}
