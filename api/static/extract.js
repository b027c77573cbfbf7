// The "extract a vector" panel: POST /api/v1/vectors/extract with stream: true, a progress bar fed by its
// `progress` events, and on `result` the new vector joins the trait list with its slider set to the
// recommended strength. Uses headers(), errorText(), sseBlocks(), loadServerInfo() and setSlider() of app.js.
"use strict";

// An original toy example: a pirate voice versus a plain one (8 pairs: 6 fit, 2 validate).
const SAMPLE_PAIRS = [
  ["How do I boil an egg?", "Arr, drop the egg in the bubblin' pot, matey, and count to nine hundred!", "Put the egg in boiling water for about nine minutes."],
  ["What is the capital of France?", "Paris, ye landlubber, where the finest rum be flowin'!", "The capital of France is Paris."],
  ["How do I save money?", "Bury yer doubloons on an island and guard the map, arr!", "Set a monthly budget and put a fixed amount into savings."],
  ["Why is the sky blue?", "Arr, 'tis the sea's reflection, matey, blue as Davy Jones's locker!", "Air scatters blue light more than red light."],
  ["How do I make friends?", "Share yer grog with the crew and sing shanties, me hearty!", "Be friendly, ask people about themselves, and join group activities."],
  ["What should I eat for breakfast?", "Hardtack and salted fish, like any proper buccaneer, arr!", "Oatmeal with fruit or eggs with toast are good options."],
  ["How do I stay healthy?", "Eat yer limes to keep the scurvy away, ye scallywag!", "Eat balanced meals, exercise regularly, and sleep well."],
  ["What is a good hobby?", "Treasure huntin' and swabbin' the deck, arr, nothin' finer!", "Reading, gardening or walking are relaxing hobbies."],
];

function exLines(id) {
  return $(id).value.split("\n").map((l) => l.trim()).filter(Boolean);
}

function extractBody() {
  const name = $("ex-name").value.trim();
  if (!name) throw new Error("give the vector a name");
  if ($("ex-mode").value === "texts") {
    return { name, positive: exLines("ex-positive"), negative: exLines("ex-negative"), stream: true };
  }
  const pairs = exLines("ex-pairs").map((line, i) => {
    const parts = line.split("|").map((p) => p.trim());
    if (parts.length !== 3 || parts.some((p) => !p)) throw new Error(`line ${i + 1}: write  question | trait answer | trait-free answer`);
    return { question: parts[0], positive: parts[1], negative: parts[2] };
  });
  return { name, pairs, stream: true };
}

function exStatus(text, isError = false) {
  $("ex-status").textContent = text;
  $("ex-status").className = isError ? "error" : "muted";
}

function describeResult(result) {
  const v = result.validation;
  const top = v.range.find((p) => p.fraction === v.top_fraction);
  return `registered ${result.vector.name}: layer ${result.recommended_layer}, strength ±${result.recommended_scalar} ` +
    `(held-out margin ${top.margin_minus.toFixed(2)} → ${top.margin_plus.toFixed(2)} nats/token from −s to +s; ` +
    `trait-free perplexity ×${top.ppl_ratio_plus.toFixed(2)} at +s), ${result.seconds.toFixed(0)} s`;
}

async function extractVector() {
  let body;
  try {
    body = extractBody();
  } catch (err) {
    return exStatus(err.message, true);
  }
  const bar = $("ex-progress");
  $("ex-run").disabled = true;
  bar.hidden = false;
  bar.value = 0;
  exStatus("extracting…");
  try {
    const response = await fetch("/api/v1/vectors/extract", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorText(response));
    let result = null;
    for await (const { event, data } of sseBlocks(response)) {
      if (event === "progress") {
        bar.max = data.total;
        bar.value = data.done;
        exStatus(`${data.stage}: ${data.done}/${data.total} engine jobs`);
      } else if (event === "error") {
        throw new Error(`${data.error.type}: ${data.error.message}`);
      } else if (event === "result") {
        result = data;
      }
    }
    if (!result) throw new Error("the stream ended without a result");
    await loadServerInfo();
    const row = document.querySelector(`.trait[data-trait="${CSS.escape(result.vector.name)}"]`);
    if (row) setSlider(row, result.recommended_scalar);
    exStatus(describeResult(result));
  } catch (err) {
    exStatus(err.message, true);
  } finally {
    $("ex-run").disabled = false;
    bar.hidden = true;
  }
}

function initExtract() {
  $("ex-mode").onchange = () => {
    const texts = $("ex-mode").value === "texts";
    $("ex-pairs-box").hidden = texts;
    $("ex-texts-box").hidden = !texts;
  };
  $("ex-sample").onclick = () => {
    $("ex-name").value ||= "pirate";
    $("ex-pairs").value = SAMPLE_PAIRS.map((p) => p.join(" | ")).join("\n");
    $("ex-positive").value = SAMPLE_PAIRS.map((p) => p[1]).join("\n");
    $("ex-negative").value = SAMPLE_PAIRS.map((p) => p[2]).join("\n");
  };
  $("ex-run").onclick = extractVector;
}
