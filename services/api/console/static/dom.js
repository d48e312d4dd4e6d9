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
