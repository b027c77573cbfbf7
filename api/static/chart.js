// The assistant-axis chart (inline SVG): one series per column (STEERED, DEFAULT), one point per assistant
// turn of that column's own conversation. It shows the current run only: `clearAxis` empties it when a
// run starts, fails or is stopped. Loaded before app.js, which calls `drawAxis` with the final frames.
"use strict";

const SIGN_NOTE = "above 0: like the default assistant persona · below 0: drifting away from it (role-play, other personas)";

function chartEscape(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Round tick values: steps of 1, 2 or 5 x 10^k covering [lo, hi] with about `count` intervals.
function niceTicks(lo, hi, count = 4) {
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || 10 * power;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  const decimals = Math.max(0, -Math.floor(Math.log10(step)));
  return { ticks, label: (v) => v.toFixed(decimals) };
}

function clearAxis(note = "") {
  document.getElementById("axis-chart").innerHTML = "";
  document.getElementById("axis-note").textContent = note;
  document.getElementById("axis-sign").hidden = true;
}

// entries: [{type, pc_titles, turns: [{pc_values, snippet}]}], one per column, from the final frames.
function drawAxis(entries, unavailable) {
  const svg = document.getElementById("axis-chart");
  clearAxis(unavailable ? `Assistant-axis monitoring unavailable: ${unavailable}` : "");
  if (!entries || !entries.length) return;
  const title = entries[0].pc_titles[0];
  const series = entries.map((e) => ({ type: e.type, values: e.turns.map((t) => t.pc_values[title]), turns: e.turns }));
  const all = series.flatMap((s) => s.values).filter((v) => typeof v === "number");
  if (!all.length) return;
  const W = 640, H = 260, left = 64, right = 16, top = 30, bottom = 40;
  let lo = Math.min(0, ...all), hi = Math.max(0, ...all);
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const turns = Math.max(...series.map((s) => s.values.length));
  const x = (i) => (turns === 1 ? (left + W - right) / 2 : left + 20 + (i * (W - left - right - 40)) / (turns - 1));
  const y = (v) => top + ((hi - v) * (H - top - bottom)) / (hi - lo);
  const parts = [`<text class="title" x="${left}" y="16">${chartEscape(title)} (value per assistant turn)</text>`];
  const { ticks, label } = niceTicks(lo, hi);
  for (const v of ticks) {
    parts.push(`<line class="grid-line" x1="${left}" x2="${W - right}" y1="${y(v)}" y2="${y(v)}"/>`);
    parts.push(`<text class="tick" x="${left - 8}" y="${y(v) + 4}" text-anchor="end">${label(v)}</text>`);
  }
  parts.push(`<line class="zero" x1="${left}" x2="${W - right}" y1="${y(0)}" y2="${y(0)}"/>`);
  parts.push(`<text class="sign" x="${W - right - 4}" y="${y(0) - 5}" text-anchor="end">↑ assistant-like</text>`);
  parts.push(`<text class="sign" x="${W - right - 4}" y="${y(0) + 14}" text-anchor="end">↓ away from the assistant</text>`);
  for (let i = 0; i < turns; i++) {
    const text = `turn ${i + 1}${i === turns - 1 ? " (new)" : ""}`;
    parts.push(`<text class="tick" x="${x(i)}" y="${H - bottom + 18}" text-anchor="middle">${text}</text>`);
  }
  series.forEach((s, n) => {
    const pts = s.values.map((v, i) => (typeof v === "number" ? [x(i), y(v), v, i] : null)).filter(Boolean);
    parts.push(`<polyline class="series-${s.type}" points="${pts.map((p) => `${p[0]},${p[1]}`).join(" ")}"/>`);
    for (const [px, py, v, i] of pts) {
      const tip = `${s.type} turn ${i + 1}: ${v.toFixed(3)} — ${s.turns[i].snippet}`;
      parts.push(`<circle class="pt pt-${s.type}" data-type="${s.type}" cx="${px}" cy="${py}" r="4"><title>${chartEscape(tip)}</title></circle>`);
    }
    parts.push(`<rect x="${left + 8 + n * 90}" y="${H - 14}" width="10" height="10" class="pt-${s.type}"/>`);
    parts.push(`<text class="tick" x="${left + 22 + n * 90}" y="${H - 5}">${s.type.toLowerCase()}</text>`);
  });
  svg.innerHTML = parts.join("");
  const sign = document.getElementById("axis-sign");
  sign.textContent = SIGN_NOTE;
  sign.hidden = false;
}
