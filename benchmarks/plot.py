"""PNG plots of a results.json: throughput vs concurrency, and throughput vs adapter count."""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import Point, Results

STYLE = {  # system -> (colour, marker)
    "tuneserve": ("tab:blue", "o"),
    "tuneserve-simple": ("tab:cyan", "o"),
    "tuneserve-f16": ("tab:purple", "o"),
    "tuneserve-bf16": ("tab:pink", "o"),
    "seed-way": ("tab:red", "s"),
    "peft-batch": ("tab:orange", "^"),
    "tf-serve-cb": ("tab:green", "D"),
    "ceiling": ("black", "x"),
    "llama.cpp": ("tab:brown", "v"),
    "llama.cpp-f16": ("tab:olive", "v"),
    "llama.cpp-bf16": ("tab:gray", "v"),
    "llama.cpp-q4": ("goldenrod", "v"),
}


def _ok(res: Results, system: str) -> list[Point]:
    return [p for p in res.points if p.system == system and p.status == "ok"]


def _systems(res: Results) -> list[str]:
    return list(dict.fromkeys(p.system for p in res.points))


def _legend(axes: object) -> None:
    """One legend on the last panel with every system drawn on any panel."""
    seen: dict[str, object] = {}
    for ax in axes:  # type: ignore[attr-defined]
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        axes[-1].legend(list(seen.values()), list(seen), fontsize=8)  # type: ignore[index]


def plot(res: Results, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{res.config.size} model, {res.config.prompt_len}+{res.config.max_tokens} tokens, "
             f"{res.machine.get('cpus_logical')} CPUs ({res.date[:10]})")
    paths = []

    # 1. Throughput vs concurrency: one panel per K, one line per system. The ceiling (no
    #    LoRA) and tf-serve-cb (K=1 only) appear in every panel as references.
    ks = res.config.adapters
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        for system in _systems(res):
            pts = _ok(res, system)
            ref = system in ("ceiling", "tf-serve-cb")
            pts = [p for p in pts if p.adapters == k or (ref and p.adapters in (0, 1))]
            if not pts:
                continue
            pts.sort(key=lambda p: p.concurrency)
            colour, marker = STYLE.get(system, (None, "o"))
            ax.plot([p.concurrency for p in pts], [p.output_tokens_per_s for p in pts],
                    marker=marker, color=colour, linestyle="--" if ref and k != 1 else "-",
                    label=system + (" (K=1)" if system == "tf-serve-cb" and k != 1 else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(res.config.concurrency, [str(c) for c in res.config.concurrency])
        ax.set_xlabel("concurrent clients C")
        ax.set_title(f"K = {k} adapter{'s' if k != 1 else ''}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("output tokens / s")
    _legend(axes[0])
    fig.suptitle("Throughput vs concurrency — " + title, fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "throughput_vs_concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. Throughput vs K: one panel per C, one line per system that serves adapters; the ceiling
    #    and tf-serve-cb as horizontal references.
    cs = res.config.concurrency
    fig, axes = plt.subplots(1, len(cs), figsize=(5 * len(cs), 4), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], cs, strict=True):
        for system in _systems(res):
            pts = sorted((p for p in _ok(res, system) if p.concurrency == c),
                         key=lambda p: p.adapters)
            if not pts:
                continue
            colour, marker = STYLE.get(system, (None, "o"))
            if system in ("ceiling", "tf-serve-cb"):
                ax.axhline(pts[0].output_tokens_per_s or 0, color=colour, linestyle="--",
                           label=f"{system} ({'no LoRA' if system == 'ceiling' else 'K=1'})")
                continue
            ax.plot([p.adapters for p in pts], [p.output_tokens_per_s for p in pts],
                    marker=marker, color=colour, label=system)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("adapters K (each request picks one uniformly)")
        ax.set_title(f"C = {c} concurrent clients")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("output tokens / s")
    _legend(axes[0])
    fig.suptitle("Throughput vs adapter count — " + title, fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "throughput_vs_adapters.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
