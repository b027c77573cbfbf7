// Steering playground: compose a chat, pick traits or paste a vector, stream the steered and
// default answers side by side from POST /v1/steer/completion-chat, chart the assistant axis
// (chart.js), extract new vectors (extract.js). STEERED and DEFAULT each keep their own history when
// the conversation continues, as Neuronpedia's playground does: a follow-up goes after each column's
// own answer. No dependencies, no build step; nothing is fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const TYPES = ["STEERED", "DEFAULT"];
const FALLBACK_SPAN = 20; // slider span for vectors that record no recommended range
// histories: each column's conversation (null before the first run); base: the composer's part of it
const state = { traits: [], running: null, lastTexts: {}, histories: null, base: [], axis: {} };

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

// Yield {event, data} for every event of an SSE response body (data parsed as JSON).
async function* sseBlocks(response) {
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
      const lines = block.split("\n");
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      const event = (lines.find((l) => l.startsWith("event:")) || "event: message").slice(6).trim();
      if (data && data !== "[DONE]") yield { event, data: JSON.parse(data) };
    }
  }
}

// Yield the JSON payload of every `data:` event of an SSE response body.
async function* sseEvents(response) {
  for await (const block of sseBlocks(response)) yield block.data;
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

// The slider spans the trait's recommended range [-top, top] (x3 with "beyond"); the number box takes any
// value, and a value past the slider's end widens the slider to it.
function sliderSpan(trait) {
  const range = trait.recommended_scalar_range;
  const top = range ? Math.max(...range.map(Math.abs)) : FALLBACK_SPAN;
  return top * ($("beyond").checked ? 3 : 1);
}

function setSlider(row, value) {
  const slider = row.querySelector("input[type=range]");
  if (Math.abs(value) > Number(slider.max)) [slider.min, slider.max] = [-Math.abs(value), Math.abs(value)];
  slider.value = value;
  row.querySelector("input[type=number]").value = value;
}

function renderTraits() {
  const box = $("traits");
  const previous = {}; // keep what the user set when the list is redrawn
  for (const row of box.querySelectorAll(".trait")) {
    previous[row.dataset.trait] = [row.querySelector("input[type=number]").value, row.querySelector("select").value];
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
    const span = sliderSpan(trait);
    const step = Number((span / 40).toPrecision(2));
    const layers = trait.layers.map((l) => `<option ${l === trait.default_layer ? "selected" : ""}>${l}</option>`).join("");
    const hint = trait.recommended_scalar_range
      ? `recommended range ±${trait.recommended_scalar_range[1]} at layer ${trait.default_layer}`
      : "no recommended range recorded";
    row.innerHTML = `<span class="name" title="${escapeHTML(`${trait.description || trait.name} (${hint})`)}">${escapeHTML(trait.name)}</span>
      <input type="range" min="${-span}" max="${span}" step="${step}" value="0" aria-label="${escapeHTML(trait.name)} strength">
      <input type="number" step="${step}" value="0" aria-label="${escapeHTML(trait.name)} strength value">
      <select title="layer">${layers}</select>`;
    const slider = row.querySelector("input[type=range]");
    slider.oninput = () => (row.querySelector("input[type=number]").value = slider.value);
    row.querySelector("input[type=number]").onchange = (e) => setSlider(row, Number(e.target.value) || 0);
    if (previous[trait.name]) {
      row.querySelector("select").value = previous[trait.name][1];
      setSlider(row, Number(previous[trait.name][0]));
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
    const strength = Number(row.querySelector("input[type=number]").value);
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

function requestBody(prompt, types) {
  const chosen = vectors();
  const seed = $("seed").value.trim();
  return {
    prompt,
    types: types || (chosen.length ? TYPES : ["DEFAULT"]),
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
  if ("assistant_axis" in frame) {
    for (const entry of frame.assistant_axis || []) state.axis[entry.type] = entry;
    drawAxis(TYPES.map((t) => state.axis[t]).filter(Boolean), frame.assistant_axis_unavailable);
  }
}

// One streamed request; its frames fill the columns of the types it asks for.
async function stream(body) {
  const response = await fetch("/v1/steer/completion-chat", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.running.signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  for await (const frame of sseEvents(response)) {
    if (frame.error) throw new Error(`${frame.type}: ${frame.error}`); // Neuronpedia's flat error frame
    showFrame(frame);
  }
}

// A fresh run from the composer (follow-up: null), or each column's own history plus the follow-up.
async function run(followUp = null) {
  let requests;
  try {
    if (followUp === null) {
      const body = requestBody(messages());
      if (!body.prompt.length) return setStatus("write a message first", true);
      state.base = body.prompt;
      state.histories = Object.fromEntries(body.types.map((t) => [t, body.prompt]));
      requests = [body];
    } else {
      for (const t of Object.keys(state.histories)) {
        state.histories[t] = [...state.histories[t], { role: "assistant", content: state.lastTexts[t] || "" }, { role: "user", content: followUp }];
      }
      requests = Object.entries(state.histories).map(([t, prompt]) => requestBody(prompt, [t]));
    }
  } catch (err) {
    return setStatus(err.message, true);
  }
  state.running = new AbortController();
  state.lastTexts = {};
  state.axis = {};
  clearAxis();
  setBusy(true);
  for (const t of TYPES) {
    $(`out-${t}`).textContent = "";
    showHistory(t);
  }
  if (!state.histories.STEERED) $("out-STEERED").innerHTML = '<span class="muted">no steering selected</span>';
  setStatus("generating…");
  try {
    await Promise.all(requests.map(stream));
    setStatus("done");
  } catch (err) {
    state.running.abort(); // one column failed: stop the other too
    clearAxis(err.name === "AbortError" ? "stopped: the chart shows completed runs only" : "");
    setStatus(err.name === "AbortError" ? "stopped" : err.message, err.name !== "AbortError");
  } finally {
    state.running = null;
    setBusy(false);
  }
}

// The turns a column added to the composer's conversation (its earlier answers and the follow-ups).
function showHistory(type) {
  const box = $(`hist-${type}`);
  const turns = state.histories && state.histories[type] ? state.histories[type].slice(state.base.length) : [];
  box.innerHTML = turns.map((m) => `<p class="turn ${m.role}"><b>${m.role}</b> ${escapeHTML(m.content)}</p>`).join("");
}

function continueRun() {
  const text = $("follow-up").value.trim();
  if (!text) return setStatus("write a follow-up first", true);
  $("follow-up").value = "";
  run(text);
}

function setBusy(busy) {
  $("run").disabled = busy;
  $("stop").disabled = !busy;
  $("continue").disabled = busy || !state.histories || !Object.keys(state.lastTexts).length;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function escapeHTML(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
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
  $("run").onclick = () => run();
  $("continue").onclick = continueRun;
  $("stop").onclick = () => state.running && state.running.abort();
  $("beyond").onchange = renderTraits;
  initExtract();
  addMessage("system", "You are a helpful assistant.");
  addMessage("user", "Tell me about your favourite book.");
  loadServerInfo();
}

init();
