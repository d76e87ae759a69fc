// The status page: polls /ui/status.json every second and renders it. Text goes in with
// textContent only (hrefs and reasons come from clients and origins).
"use strict";

const POLL_MS = 1000;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, String(v));
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "?";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function ago(epoch) {
  return duration(Date.now() / 1000 - epoch) + " ago";
}

function nameOf(x) {
  return x.glance_id ? "glance " + x.glance_id : (x.href || x.key);
}

function rows(tbody, items, cells) {
  tbody.replaceChildren(...items.map(x => el("tr", {}, ...cells(x))));
}

function imageCells(x) {
  return [
    el("td", { class: "name", title: x.key }, nameOf(x)),
    el("td", { class: "num" }, bytes(x.size)),
    el("td", { class: "num" }, x.hits),
    el("td", { class: "num" }, ago(x.last_accessed)),
  ];
}

function download(d) {
  const bar = d.total
    ? el("progress", { max: d.total, value: d.bytes })
    : el("progress", {});
  const facts = el("div", { class: "facts" },
    el("span", {}, el("b", {}, bytes(d.bytes)), " of ", d.total ? bytes(d.total) : "unknown size"),
    el("span", {}, el("b", { class: "percent" }, d.percent === null ? "–" : d.percent.toFixed(1) + " %")),
    el("span", {}, el("b", {}, bytes(d.rate) + "/s")),
    el("span", {}, "ETA ", el("b", {}, d.eta_seconds === null ? "?" : duration(d.eta_seconds))),
    el("span", {}, el("b", { class: "clients" }, d.clients), d.clients === 1 ? " client" : " clients"),
    el("span", {}, d.source === "peer" ? "from peer " + d.peer : "from " + d.source),
    el("span", {}, d.phase),
  );
  return el("div", {
    class: "download",
    "data-key": d.key,
    "data-bytes": d.bytes,
    "data-total": d.total === null ? "" : d.total,
  }, el("div", { class: "name", title: d.key }, nameOf(d)), bar, facts);
}

function render(s) {
  const c = s.cache;
  const bar = $("cache-bar");
  bar.style.width = Math.min(100, c.used_ratio * 100).toFixed(1) + "%";
  bar.classList.toggle("high", c.used_ratio > 0.9);
  $("cache-bytes").textContent = bytes(c.bytes);
  $("cache-max").textContent = c.max_bytes ? bytes(c.max_bytes) : "no limit";
  $("cache-entries").textContent = c.entries;

  const t = s.traffic;
  $("hit-ratio").textContent = t.hit_ratio === null ? "–" : (t.hit_ratio * 100).toFixed(1) + " %";
  $("hits").textContent = t.hits;
  $("misses").textContent = t.misses;
  $("from-cache").textContent = bytes(t.bytes_from_cache);
  $("from-origin").textContent = bytes(t.bytes_from_origin);
  $("origin-requests").textContent = t.origin_requests;
  $("evictions").textContent = t.evictions;

  $("downloads").replaceChildren(...s.downloads.map(download));
  $("downloads-count").textContent = s.downloads.length ? "(" + s.downloads.length + ")" : "";
  $("downloads-none").hidden = s.downloads.length > 0;

  $("queue").replaceChildren(...s.queue.images.map(id => el("li", {}, id)));
  $("queue-count").textContent = s.queue.length ? "(" + s.queue.length + ")" : "";
  $("queue-none").hidden = s.queue.length > 0;

  rows($("recent").tBodies[0], s.recent, imageCells);
  rows($("largest").tBodies[0], s.largest, imageCells);

  rows($("events").tBodies[0], s.events, e => [
    el("td", { class: "num" }, ago(e.at)),
    el("td", {}, el("span", { class: "tag " + e.kind }, e.kind)),
    el("td", { class: "name", title: e.key }, e.href ? nameOf({ href: e.href, key: e.key }) : e.key),
    el("td", { title: e.detail || "" }, e.reason + (e.size !== undefined ? " (" + bytes(e.size) + ")" : "")),
  ]);
  $("events-none").hidden = s.events.length > 0;

  const f = s.fleet;
  $("fleet").hidden = !f;
  if (f) {
    $("fleet-self").textContent = "this node: " + f.node;
    $("fleet-error").hidden = !f.error;
    $("fleet-error").textContent = f.error || "";
    rows($("fleet-nodes").tBodies[0], f.nodes, n => [
      el("td", { class: "name" }, n.url + (n.url === f.node ? " (this node)" : "")),
      el("td", { class: "num" }, n.published),
      el("td", { class: "num" }, n.filling),
      el("td", { class: "num" }, bytes(n.published_bytes)),
      el("td", { class: "num" }, duration(n.heartbeat_age) + " ago"),
    ]);
  }
}

async function poll() {
  try {
    const r = await fetch("/ui/status.json", { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) { location.reload(); return; }
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("updated").classList.remove("error");
  } catch (e) {
    $("updated").textContent = "cannot reach the server: " + e.message;
    $("updated").classList.add("error");
  }
  setTimeout(poll, POLL_MS);
}

poll();
