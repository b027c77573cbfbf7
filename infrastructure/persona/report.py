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
        ax2.plot(["-s", "0", "+s"], r.preference_shift, marker="o", label=r.trait)
    ax1.set_title("mean answer projection on the trait direction\n(probe layer = steered layer + 2)")
    ax2.set_title("log-likelihood shift: trait-expressing minus trait-free\nreferences (nats/token, vs unsteered)")
    ax2.axhline(0, color="grey", lw=0.5)
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
        "| trait | layer (probe) | s | projection −s / 0 / +s | Δlogp trait refs −s / +s "
        "| Δlogp trait-free refs −s / +s | preference shift −s / +s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, pos, neg, pref = r.projection, r.dlogp_positive, r.dlogp_negative, r.preference_shift
        lines.append(
            f"| {r.trait} | {r.layer} ({r.probe_layer}) | {r.scalars[2]:.3g} | {p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f} "
            f"| {pos[0]:+.3f} / {pos[2]:+.3f} | {neg[0]:+.3f} / {neg[2]:+.3f} | {pref[0]:+.3f} / {pref[2]:+.3f} |"
        )
    return lines


def _samples(results: list[TraitEval]) -> list[str]:
    lines = ["## Sample outputs (first held-out question, greedy)", ""]
    for r in results:
        lines.append(f"**{r.trait}**")
        lines.append("")
        for label, text in zip(("−s", "0", "+s"), r.samples):
            lines.append(f"- {label}: {' '.join(text.split())[:220]!r}")
        lines.append("")
    return lines


def _notes(results: list[TraitEval]) -> list[str]:
    """An honest reading of the numbers, derived from them."""
    clear = [r.trait for r in results if r.preference_shift[2] > 0.02 and r.preference_shift[0] < -0.02]
    weak = [r.trait for r in results if r.trait not in clear]
    lines = [
        "## Reading the numbers",
        "",
        "- The projection rises with s for every trait largely by construction: the added s·v is carried by the "
        "residual stream to the probe layer. It shows the vector survives two more layers, not that behaviour changed.",
        "- The likelihood shift is the behavioural measure. Traits where +s makes the trait-expressing references more "
        "likely than the trait-free ones and −s does the opposite (by > 0.02 nats/token): "
        + (", ".join(clear) or "none")
        + ".",
        "- Little or inconsistent effect on this 135M model: "
        + (", ".join(weak) or "none")
        + ". SmolLM2-135M follows system prompts weakly, so its positive and negative answers differ less than a "
        "larger model's would, and the vectors carry part style/topic rather than the trait alone.",
        "",
    ]
    return lines


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
        "s = the vector file's `recommended_scalar` (|s·v| ≈ 0.2 × the median residual norm there).",
        "Regenerate everything with `pipenv run python -m scripts.build_persona_data`.",
        "",
        "- **projection**: mean over the answer-producing positions of h·v̂ at the probe layer (steered layer + 2).",
        "- **Δlogp**: steered minus unsteered mean log-probability per token of the reference answers "
        "(one trait-expressing and one trait-free reference per question); **preference shift** = "
        "Δlogp(trait refs) − Δlogp(trait-free refs): positive means steering made the trait more likely.",
        "",
        *_table(results),
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
