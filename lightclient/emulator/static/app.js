// The emulator's dashboard: one state fetch, then live entries over server-sent events (no reload).
"use strict";
const $ = (sel) => document.querySelector(sel);
let selected = null;
let refreshTimer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function describe(e) {
  switch (e.kind) {
    case "telemetry": {
      const props = Object.entries(e.properties || {}).map(([k, v]) => `${k}=${v}`).join(" ");
      return [el("code", {}, e.body), props ? "  " + props : ""];
    }
    case "c2d": return [el("code", {}, e.body)];
    case "method": return [`${e.method}(`, el("code", {}, JSON.stringify(e.payload)), ")"];
    case "method-result": return [`${e.method} → ${e.status} `, el("code", {}, JSON.stringify(e.payload))];
    case "desired": return [`v${e.version} `, el("code", {}, JSON.stringify(e.patch))];
    case "diagnostic": return [e.text];
    default: return [""];
  }
}

const LABEL = { telemetry: "D2C", c2d: "C2D", method: "method →", "method-result": "method ←",
                desired: "desired →", connected: "connected", disconnected: "disconnected", diagnostic: "diagnostic" };

function addFeed(e) {
  const time = new Date(e.time * 1000).toLocaleTimeString();
  const item = el("li", { class: `k-${e.kind}`, "data-kind": e.kind, "data-seq": e.seq },
    el("span", { class: "kind" }, LABEL[e.kind] || e.kind), el("span", { class: "who" }, e.identity || "?"),
    ...describe(e), el("span", { class: "time" }, time));
  $("#feed").prepend(item);
  while ($("#feed").children.length > 300) $("#feed").lastChild.remove();
  if (e.kind === "diagnostic") $("#diagnostics").prepend(el("li", {}, e.text));
}

function renderDevices(devices) {
  const body = $("#devices tbody");
  body.replaceChildren(...devices.map((d) => {
    const row = el("tr", { class: "device" + (d.identity === selected ? " selected" : ""),
                           "data-device": d.identity, "data-connected": String(d.connected) },
      el("td", {}, el("span", { class: "dot", title: d.connected ? "connected" : "offline" })),
      el("td", {}, d.identity), el("td", {}, d.modelId || "—"),
      el("td", {}, d.auth === "selfSigned" ? "thumbprint" : "CA"));
    row.onclick = () => { selected = d.identity; fillForms(d); renderDevices(devices); };
    return row;
  }));
  const current = devices.find((d) => d.identity === selected) || devices[0];
  if (current) {
    if (!selected) { selected = current.identity; fillForms(current); }
    $("#twin-of").textContent = current.identity;
    $("#twin").textContent = JSON.stringify(current.twin, null, 2);
  }
}

function fillForms(d) {
  for (const form of document.forms) {
    if (form.deviceId && !form.deviceId.value) form.deviceId.value = d.deviceId;
    if (form.moduleId && !form.moduleId.value && d.moduleId) form.moduleId.value = d.moduleId;
  }
}

async function refresh() {
  const state = await (await fetch("/api/state")).json();
  $("#hub").textContent = `${state.hub.hostname} · mqtts port ${state.hub.port}`;
  renderDevices(state.devices);
  return state;
}

function scheduleRefresh() {   // many entries at once cost one state fetch
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 100);
}

async function post(path, body) {
  const reply = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                    body: JSON.stringify(body) });
  const data = await reply.json();
  if (!reply.ok) throw new Error(data.message || reply.statusText);
  return data;
}

function json(text) { return text.trim() ? JSON.parse(text) : null; }

function wire(formId, action) {
  const form = document.getElementById(formId);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = form.querySelector("output");
    try {
      const result = await action(form);
      if (out) out.textContent = JSON.stringify(result);
    } catch (err) {
      if (out) out.textContent = "error: " + err.message; else alert(err.message);
    }
  });
}

wire("c2d-form", (f) => post("/api/c2d", { deviceId: f.deviceId.value, body: f.body.value }));
wire("method-form", (f) => post("/api/method", { deviceId: f.deviceId.value, moduleId: f.moduleId.value || null,
                                                methodName: f.methodName.value, payload: json(f.payload.value) }));
wire("desired-form", (f) => post("/api/desired", { deviceId: f.deviceId.value, patch: json(f.patch.value) }));

async function start() {
  const state = await refresh();
  for (const e of state.feed) addFeed(e);
  for (const d of state.diagnostics.slice(-50)) $("#diagnostics").prepend(el("li", {}, d.text));
  const after = state.feed.length ? state.feed[state.feed.length - 1].seq : 0;
  const stream = new EventSource(`/api/stream?after=${after}`);   // nothing between the two is lost
  stream.onopen = () => { $("#live").textContent = "live"; $("#live").className = "pill on"; };
  stream.onerror = () => { $("#live").textContent = "reconnecting…"; $("#live").className = "pill off"; };
  stream.addEventListener("feed", (message) => {
    const e = JSON.parse(message.data);
    addFeed(e);
    if (e.kind !== "telemetry" || e.identity === selected) scheduleRefresh();
  });
}

start();
