"""Markdown report and PNG plots of the persona-data evaluation (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from infrastructure.persona.evaluation import TraitEval

REPORT = "persona_data_report.md"


def _plots(docs: Path, results: list[TraitEval], axis: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ax1.plot(["-s", "0", "+s"], r.projection, marker="o", label=r.trait)
        ax2.plot(["-s", "0", "+s"], r.margins, marker="o", label=r.trait)
    ax1.set_title("mean answer projection on the trait direction\n(probe layer = steered layer + 2)")
    ax2.set_title("held-out margin: log-prob per token of trait-expressing\nminus trait-free references (nats/token)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "persona_trait_steering.png", dpi=110)
    plt.close(fig)
    names.append("persona_trait_steering.png")
    if axis is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(axis["default"], bins=12, alpha=0.6, label="default assistant")
        ax.hist(axis["roles"], bins=12, alpha=0.6, label="held-out roles")
        ax.set_title(f"assistant-axis value at layer {axis['layer']} (AUC {axis['auc']:.3f})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / "persona_axis_separation.png", dpi=110)
        plt.close(fig)
        names.append("persona_axis_separation.png")
    return names


def _table(results: list[TraitEval]) -> list[str]:
    lines = [
        "| trait | layer (probe) | s | margin −s / 0 / +s | rise +s vs −s | monotonic | projection −s / 0 / +s "
        "| projection shift | trait-free ppl ×, −s / +s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, p, f = r.margins, r.projection, r.fluency
        lines.append(
            f"| {r.trait} | {r.layer} ({r.probe_layer}) | {r.scalars[2]:.3g} | {m[0]:+.2f} / {m[1]:+.2f} / {m[2]:+.2f} "
            f"| **{r.margin_rise:+.2f}** | {'yes' if r.monotonic else 'no'} | {p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f} "
            f"| {p[2] - p[0]:+.2f} | {f[0]:.2f} / {f[2]:.2f} |"
        )
    return lines


def _extraction_table(results: list[TraitEval]) -> list[str]:
    """How each vector was fitted and chosen (from its file's metadata: validation split only)."""
    lines = [
        "| trait | method | fit / validation pairs | chosen layer (rise/unit at 0.1) | top fraction | "
        "validation margin −s / +s | validation ppl × −s / +s | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        x = r.meta.get("extraction")
        if not x:
            lines.append(f"| {r.trait} | {r.meta.get('method', 'generation')} | – | {r.layer} | – | – | – | – |")
            continue
        v = x["validation"]
        best = next(s for s in v["layers"] if s["layer"] == v["chosen_layer"])
        top = next(p for p in v["range"] if p["fraction"] == v["top_fraction"])
        lines.append(
            f"| {r.trait} | {r.meta['method']} "
            f"| {x['split']['fit']['positive']} / {x['split']['validation']['positive']} "
            f"| {v['chosen_layer']} ({best['rise_per_unit']:.2f}) | {v['top_fraction']} "
            f"| {top['margin_minus']:+.2f} / {top['margin_plus']:+.2f} "
            f"| {top['ppl_ratio_minus']:.2f} / {top['ppl_ratio_plus']:.2f} | {x['seconds']:.0f} |"
        )
    return lines


def _samples(results: list[TraitEval]) -> list[str]:
    lines = ["## Sample outputs (held-out questions, greedy, steered at −s / 0 / +s)", ""]
    for r in results:
        lines.append(f"**{r.trait}** (layer {r.layer}, s = {r.scalars[2]:.3g})")
        lines.append("")
        for q, question in enumerate(r.questions):
            lines.append(f"- *{question}*")
            for label, texts in zip(("−s", "0", "+s"), r.samples):
                lines.append(f"  - {label}: {' '.join(texts[q].split())[:220]!r}")
        lines.append("")
    return lines


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some n-word sequence occurs `times` times or more (a greedy answer stuck in a loop)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) >= times for g in set(grams))


def _notes(results: list[TraitEval]) -> list[str]:
    """An honest reading of the numbers, derived from them."""
    clear = [r.trait for r in results if r.margin_rise >= 0.4 and r.monotonic]
    weak = [r.trait for r in results if r.trait not in clear]
    looping = [r.trait for r in results if any(loops(t) for t in r.samples[-1])]
    return [
        "## Reading the numbers",
        "",
        "- The margin is the behavioural measure: steering at +s should make the held-out trait-expressing "
        "references more likely relative to the trait-free ones, and −s the opposite. Traits whose margin rises "
        "by ≥ 0.4 nats/token from −s to +s, monotonically through 0: " + (", ".join(clear) or "none") + ".",
        "- Below that bar: " + (", ".join(weak) or "none") + ".",
        "- The projection rises with s largely by construction (the added s·v is carried to the probe layer); "
        "it shows the vector survives two more layers, not that behaviour changed.",
        "- The fluency column is the perplexity of the trait-free references steered over unsteered: at +s it "
        "rises partly because the trait is promoted, at −s it should stay near 1.",
        "- The guard scores teacher-forced reference text, not free generation: greedy samples at +s (the top of "
        "the range) that repeat a 4-word phrase 3+ times: " + (", ".join(looping) or "none") + ". Lower strengths "
        "on the playground's sliders (which span the range) trade effect for fluency.",
        "",
    ]


def write_report(docs: Path, results: list[TraitEval], axis: dict | None, setup: dict, notes: list[str] = ()) -> Path:
    """Write the report and its plots under `docs`; returns the report's path."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    plots = _plots(docs, results, axis)
    lines = [
        "# Persona data: evaluation report",
        "",
        f"Model `{setup['model']}`; greedy answers of {setup['max_new_tokens']} new tokens to each trait's held-out "
        "questions (no system prompt), steered by adding s·v at the recommended layer (every position), "
        "s = the vector file's `recommended_scalar` (the top of its fluency-guarded range).",
        "The vectors are fitted on the authored `contrastive_pairs` of `data/prompts/{trait}_trait.json` "
        "(teacher-forced difference of mean residuals over answer tokens); the held-out `eval_questions` and "
        "`eval_references` used here never enter the fit or the choice of layer and scalar.",
        "Regenerate the vectors with `pipenv run python -m scripts.extract_persona_vectors --threads 2` and this "
        "report with `pipenv run python -m scripts.evaluate_persona_data` (or both, and the axis, with "
        "`python -m scripts.build_persona_data`).",
        "",
        "- **margin**: mean log-probability per token of the trait-expressing references minus that of the "
        "trait-free references (one of each per held-out question), nats/token.",
        "- **projection**: mean over the answer-producing positions of h·v̂ at the probe layer (steered layer + 2).",
        "- **trait-free ppl ×**: perplexity of the trait-free references steered over unsteered.",
        "",
        *_table(results),
        "",
        "**Extraction** (from each vector file's metadata; measured on the validation split of the authored pairs):",
        "",
        *_extraction_table(results),
        "",
    ]
    if axis is not None:
        lines += [
            f"**Assistant axis** (layer {axis['layer']}): AUC **{axis['auc']:.3f}** separating default-assistant "
            f"answers ({len(axis['default'])}) from held-out role-play answers ({len(axis['roles'])}) by the "
            "monitoring value (positive = assistant-like).",
            "",
        ]
    lines += [f"![{name}]({name})" for name in plots] + [""]
    lines += _notes(results) + list(notes) + ([""] if notes else [])
    lines += _samples(results)
    lines.append(f"_Evaluation took {setup['seconds']:.0f} s on this machine._")
    path = docs / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path
