"""One figure per op: time and % of copy bandwidth per mode, saved-for-backward and peak memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

from .records import ConfigResult, Run  # noqa: E402
from .registry import MODES  # noqa: E402

TARGET_LINES = {"fwd": 0.80, "bwd": 0.50}  # issue #7, GPU


def _measured(configs: Sequence[ConfigResult]) -> list[str]:
    """Providers with their own numbers (aliases repeat another's)."""
    return list(dict.fromkeys(n for c in configs for n, r in c.providers.items() if r.alias_of is None and r.times))


def _label(config: ConfigResult) -> str:
    return f"{config.case.split('/', 1)[1]} {config.dtype}"


def _bars(ax, groups: list[str], providers: list[str], value, error=None) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per provider; value(g, p) may be None."""
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs, ys, errs = [], [], [[], []]
        for g in range(len(groups)):
            v = value(g, p)
            if v is None:
                continue
            xs.append(g + (i - (len(providers) - 1) / 2) * width)
            ys.append(v)
            lo, hi = error(g, p) if error else (v, v)
            errs[0].append(v - lo)
            errs[1].append(hi - v)
        ax.bar(xs, ys, width, label=p, yerr=errs if error else None, capsize=2)
    ax.set_xticks(range(len(groups)), groups, fontsize=7, rotation=30, ha="right")


def plot_op(op: str, configs: Sequence[ConfigResult], run: Run, path: Path) -> None:
    configs = [c for c in configs if c.error is None]
    providers = _measured(configs)
    groups = [(c, mode) for c in configs for mode in MODES]
    labels = [f"{_label(c)} {mode}" for c, mode in groups]
    fig, axes = plt.subplots(2, 2, figsize=(max(12, 1.1 * len(groups)), 9))
    (ax_time, ax_bw), (ax_saved, ax_peak) = axes

    def timing(g, p):
        c, mode = groups[g]
        return c.providers[p].times.get(mode) if p in c.providers else None

    _bars(
        ax_time,
        labels,
        providers,
        lambda g, p: timing(g, p).median_ms if timing(g, p) else None,
        lambda g, p: (timing(g, p).p20_ms, timing(g, p).p80_ms),
    )
    ax_time.set_yscale("log")
    ax_time.set_ylabel("ms per call (median, p20–p80)")
    ax_time.set_title("time")

    def fraction(g, p):
        c, mode = groups[g]
        value = c.providers[p].copy_fraction.get(mode) if p in c.providers else None
        return 100 * value if value is not None else None

    _bars(ax_bw, labels, providers, fraction)
    if run.machine["device"] != "cpu":
        for mode, level in TARGET_LINES.items():
            ax_bw.axhline(100 * level, linestyle="--", linewidth=0.8, color="grey")
            ax_bw.annotate(f"{mode} target", (len(groups) - 0.5, 100 * level), fontsize=7, ha="right", va="bottom")
    ax_bw.set_ylabel(f"% of copy bandwidth ({run.copy_bandwidth['gbps']:.0f} GB/s)")
    ax_bw.set_title("effective bandwidth (byte model / median time)")

    config_labels = [_label(c) for c in configs]
    for ax, field, title in (
        (ax_saved, "saved_bytes", "saved for backward"),
        (ax_peak, "peak_delta_bytes", "peak rise over one step (fwd+bwd for ops)"),
    ):
        _bars(
            ax,
            config_labels,
            providers,
            lambda g, p, field=field: (
                (getattr(configs[g].providers[p].memory, field) or 0) / 2**20
                if p in configs[g].providers and getattr(configs[g].providers[p].memory, field) is not None
                else None
            ),
        )
        ax.set_ylabel("MiB")
        ax.set_title(title)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"{op} — {run.suite} suite, {run.machine['device_name']} ({run.machine['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
