// Steering playground: compose a chat, pick traits or paste a vector, stream the steered and
// default answers side by side from POST /v1/steer/completion-chat, chart the assistant axis.
// No dependencies, no build step; nothing is fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const TYPES = ["STEERED", "DEFAULT"];
const state = { traits: [], running: null, lastTexts: {} };

// ---- talking to the server ----

function headers() {
  const h = { "Content-Type": "application/json" };
  const secret = $("secret").value.trim();
  if (secret) h["X-SECRET-KEY"] = secret;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    // nested {"error": {type, message, param}}, or Neuronpedia's routes: {"error": message, type, param}
    const e = typeof body.error === "string" ? { type: body.type, message: body.error, param: body.param } : body.error || {};
    return `${response.status} ${e.type || ""}: ${e.message || JSON.stringify(body)}${e.param ? ` (${e.param})` : ""}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// Yield the JSON payload of every `data:` event of an SSE response body.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

// ---- the conversation editor ----

function addMessage(role, content = "") {
  const row = document.createElement("div");
  row.className = "message";
  row.innerHTML = `<select><option>system</option><option>user</option><option>assistant</option></select>
    <textarea rows="2"></textarea><button type="button" class="remove" title="remove">✕</button>`;
  row.querySelector("select").value = role;
  row.querySelector("textarea").value = content;
  row.querySelector(".remove").onclick = () => row.remove();
  $("messages").appendChild(row);
  return row;
}

function messages() {
  return [...$("messages").querySelectorAll(".message")]
    .map((row) => ({ role: row.querySelector("select").value, content: row.querySelector("textarea").value }))
    .filter((m) => m.content.trim() !== "");
}

// ---- traits and vectors ----

function renderTraits() {
  const box = $("traits");
  const previous = {}; // keep what the user set when the list is redrawn
  for (const row of box.querySelectorAll(".trait")) {
    previous[row.dataset.trait] = [row.querySelector("input").value, row.querySelector("select").value];
  }
  box.innerHTML = "";
  if (!state.traits.length) {
    box.innerHTML = '<p class="muted">no traits for this model (register some with POST /api/v1/vectors)</p>';
    return;
  }
  for (const trait of state.traits) {
    const row = document.createElement("div");
    row.className = "trait";
    row.dataset.trait = trait.name;
    const layers = trait.layers.map((l) => `<option ${l === trait.default_layer ? "selected" : ""}>${l}</option>`).join("");
    row.innerHTML = `<span class="name" title="${escapeHTML(trait.description || trait.name)}">${escapeHTML(trait.name)}</span>
      <input type="range" min="-20" max="20" step="0.5" value="0" aria-label="${escapeHTML(trait.name)} strength">
      <output>0</output><select title="layer">${layers}</select>`;
    const slider = row.querySelector("input");
    slider.oninput = () => (row.querySelector("output").textContent = slider.value);
    if (previous[trait.name]) {
      [slider.value, row.querySelector("select").value] = previous[trait.name];
      slider.oninput();
    }
    box.appendChild(row);
  }
}

async function loadServerInfo() {
  try {
    const models = await getJSON("/v1/models");
    $("model").textContent = models.data.map((m) => m.id).join(", ");
    state.traits = (await getJSON("/api/v1/traits")).traits;
    renderTraits();
  } catch (err) {
    $("traits").innerHTML = `<p class="error">${escapeHTML(err.message)}</p>`;
  }
}

function vectors() {
  const chosen = [];
  for (const row of $("traits").querySelectorAll(".trait")) {
    const strength = Number(row.querySelector("input").value);
    if (strength !== 0) {
      const layer = row.querySelector("select").value;
      chosen.push({ trait: row.dataset.trait, strength, hook: `blocks.${layer}.hook_resid_post` });
    }
  }
  const raw = $("raw-vector").value.trim();
  if (raw) {
    let values;
    try {
      values = JSON.parse(raw);
    } catch {
      throw new Error("the raw vector is not a JSON array of numbers");
    }
    if (!Array.isArray(values)) throw new Error("the raw vector must be a JSON array");
    chosen.push({ hook: $("raw-hook").value.trim(), strength: Number($("raw-strength").value), steering_vector: values });
  }
  return chosen;
}

// ---- running a request ----

function requestBody() {
  const chosen = vectors();
  const seed = $("seed").value.trim();
  return {
    prompt: messages(),
    types: chosen.length ? TYPES : ["DEFAULT"],
    vectors: chosen,
    strength_multiplier: Number($("multiplier").value),
    seed: seed === "" ? null : Number(seed),
    temperature: Number($("temperature").value),
    n_completion_tokens: Number($("max-tokens").value),
    steer_method: $("method").value,
    normalize_steering: $("normalize").checked,
    steer_special_tokens: false,
    stream: true,
  };
}

function showFrame(frame) {
  for (const output of frame.outputs || []) {
    const turns = output.chat_template || [];
    const text = turns.length ? turns[turns.length - 1].content : "";
    state.lastTexts[output.type] = text;
    $(`out-${output.type}`).textContent = text;
  }
  if ("assistant_axis" in frame) drawAxis(frame.assistant_axis, frame.assistant_axis_unavailable);
}

async function run() {
  let body;
  try {
    body = requestBody();
  } catch (err) {
    return setStatus(err.message, true);
  }
  if (!body.prompt.length) return setStatus("write a message first", true);
  state.running = new AbortController();
  state.lastTexts = {};
  setBusy(true);
  for (const t of TYPES) $(`out-${t}`).textContent = "";
  if (!body.types.includes("STEERED")) $("out-STEERED").innerHTML = '<span class="muted">no steering selected</span>';
  setStatus("generating…");
  try {
    const response = await fetch("/v1/steer/completion-chat", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const frame of sseEvents(response)) {
      if (frame.error) throw new Error(`${frame.type}: ${frame.error}`); // Neuronpedia's flat error frame
      showFrame(frame);
    }
    setStatus("done");
  } catch (err) {
    setStatus(err.name === "AbortError" ? "stopped" : err.message, err.name !== "AbortError");
  } finally {
    state.running = null;
    setBusy(false);
  }
}

function keep(type) {
  const text = state.lastTexts[type];
  if (!text) return;
  addMessage("assistant", text);
  addMessage("user", "").querySelector("textarea").focus();
}

function setBusy(busy) {
  $("run").disabled = busy;
  $("stop").disabled = !busy;
  for (const button of document.querySelectorAll(".keep")) button.disabled = busy || !state.lastTexts[button.dataset.type];
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function escapeHTML(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// ---- the assistant-axis chart (inline SVG) ----

function drawAxis(entries, unavailable) {
  const svg = $("axis-chart");
  const note = $("axis-note");
  svg.innerHTML = "";
  note.textContent = unavailable ? `Assistant-axis monitoring unavailable: ${unavailable}` : "";
  if (!entries || !entries.length) return;
  const title = entries[0].pc_titles[0];
  const series = entries.map((e) => ({ type: e.type, values: e.turns.map((t) => t.pc_values[title]), turns: e.turns }));
  const all = series.flatMap((s) => s.values).filter((v) => typeof v === "number");
  if (!all.length) return;
  const W = 640, H = 240, left = 56, right = 16, top = 26, bottom = 34;
  let lo = Math.min(0, ...all), hi = Math.max(0, ...all);
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const pad = (hi - lo) * 0.1;
  lo -= pad; hi += pad;
  const turns = Math.max(...series.map((s) => s.values.length));
  const x = (i) => (turns === 1 ? (left + W - right) / 2 : left + (i * (W - left - right)) / (turns - 1));
  const y = (v) => top + ((hi - v) * (H - top - bottom)) / (hi - lo);
  const parts = [`<text x="${left}" y="14">${escapeHTML(title)}</text>`];
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    parts.push(`<line class="grid-line" x1="${left}" x2="${W - right}" y1="${y(v)}" y2="${y(v)}"/>`);
    parts.push(`<text x="${left - 6}" y="${y(v) + 4}" text-anchor="end">${v.toFixed(2)}</text>`);
  }
  parts.push(`<line class="zero" x1="${left}" x2="${W - right}" y1="${y(0)}" y2="${y(0)}"/>`);
  for (let i = 0; i < turns; i++) {
    const anchor = turns === 1 ? "middle" : i === 0 ? "start" : i === turns - 1 ? "end" : "middle";
    const label = `turn ${i + 1}${i === turns - 1 ? " (new)" : ""}`;
    parts.push(`<text x="${x(i)}" y="${H - bottom + 16}" text-anchor="${anchor}">${label}</text>`);
  }
  series.forEach((s, n) => {
    const pts = s.values.map((v, i) => (typeof v === "number" ? [x(i), y(v), v, i] : null)).filter(Boolean);
    parts.push(`<polyline class="series-${s.type}" points="${pts.map((p) => `${p[0]},${p[1]}`).join(" ")}"/>`);
    for (const [px, py, v, i] of pts) {
      const tip = `${s.type} turn ${i + 1}: ${v.toFixed(3)} — ${s.turns[i].snippet}`;
      parts.push(`<circle class="pt pt-${s.type}" data-type="${s.type}" cx="${px}" cy="${py}" r="4"><title>${escapeHTML(tip)}</title></circle>`);
    }
    parts.push(`<rect x="${W - right - 150}" y="${6 + n * 14}" width="10" height="10" class="pt-${s.type}"/>`);
    parts.push(`<text x="${W - right - 135}" y="${15 + n * 14}">${s.type.toLowerCase()}</text>`);
  });
  svg.innerHTML = parts.join("");
}

// ---- start-up ----

function init() {
  $("secret").value = sessionStorage.getItem("persona-secret") || "";
  let loadedWith = $("secret").value.trim();
  $("secret").onchange = () => {
    const secret = $("secret").value.trim();
    if (secret === loadedWith) return;
    loadedWith = secret;
    sessionStorage.setItem("persona-secret", secret);
    loadServerInfo();
  };
  $("add-user").onclick = () => addMessage("user");
  $("add-assistant").onclick = () => addMessage("assistant");
  $("run").onclick = run;
  $("stop").onclick = () => state.running && state.running.abort();
  for (const button of document.querySelectorAll(".keep")) button.onclick = () => keep(button.dataset.type);
  addMessage("system", "You are a helpful assistant.");
  addMessage("user", "Tell me about your favourite book.");
  loadServerInfo();
}

init();
