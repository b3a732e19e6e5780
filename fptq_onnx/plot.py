"""PNG of per-layer activation ranges against the policy thresholds (written beside the model)."""

from __future__ import annotations

from pathlib import Path

STRATEGY_COLORS = {
    "static": "#2ca02c",
    "lae+static": "#1f77b4",
    "per_token": "#d62728",
    "per_block": "#9467bd",
    "float": "#7f7f7f",
}


def _layer(name: str) -> int | None:
    """'model.layers.3.mlp.up_proj' -> 3; None outside the decoder layers (lm_head)."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None


def plot_ranges(manifest: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linears = manifest["linears"]
    names = list(linears)
    after = 1 + max((layer for n in names if (layer := _layer(n)) is not None), default=-1)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names}, key=lambda k: [n.rsplit(".", 1)[-1] for n in names].index(k))
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 1.9 * len(kinds) + 1), sharex=True, squeeze=False)
    config = manifest.get("config", {})
    for ax, kind in zip(axes[:, 0], kinds):
        # a linear outside the layers (lm_head, --quantize-lm-head) is drawn right after the last layer
        rows = [(layer if (layer := _layer(n)) is not None else after, linears[n])
                for n in names if n == kind or n.endswith("." + kind)]
        # One call per artist kind (not per layer): a 30-layer model draws in a fraction of the time.
        ax.bar([layer for layer, _ in rows], [info["max_abs"] for _, info in rows], width=0.8,
               color=[STRATEGY_COLORS.get(info["strategy"], "#000000") for _, info in rows])
        ticks = [(layer, info["max_abs_equalized"]) for layer, info in rows
                 if info["max_abs_equalized"] < info["max_abs"]]
        if ticks:
            ax.hlines([m for _, m in ticks], [x - 0.4 for x, _ in ticks], [x + 0.4 for x, _ in ticks],
                      color="black", lw=1.5)
        for key, style in (("v0", "--"), ("v1", ":")):
            if key in config:
                ax.axhline(config[key], color="gray", ls=style, lw=1, label=f"{key} = {config[key]:g}")
        ax.set_yscale("log")
        ax.set_ylabel(f"{kind}\nmax |X|")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STRATEGY_COLORS.values()]
    labels = list(STRATEGY_COLORS)
    axes[0, 0].legend(handles + axes[0, 0].get_legend_handles_labels()[0],
                      labels + axes[0, 0].get_legend_handles_labels()[1], ncol=7, fontsize=8, loc="upper left",
                      bbox_to_anchor=(0, 1.45))
    axes[-1, 0].set_xlabel("decoder layer  (black tick: max |X| after equalization)")
    fig.suptitle(f"{manifest.get('method', '')}: calibrated input range of each linear, by decision", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
