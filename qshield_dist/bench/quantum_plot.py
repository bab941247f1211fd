"""The quantum scaling benchmark's figure (bench/quantum.py makes its rows)."""

from __future__ import annotations

from typing import Any


def plot_scaling(rows: list[dict[str, Any]], path: str) -> str:
    """Write a two-panel PNG (us/sample, peak RSS delta vs qubits) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    variants = sorted({r["variant"] for r in rows if "error" not in r and r.get("name") == "quantum_scaling"})
    for v in variants:
        pts = sorted(
            (r for r in rows if r.get("variant") == v and "error" not in r), key=lambda r: r["qubits"]
        )
        q = [r["qubits"] for r in pts]
        label = f"{v} ({pts[0]['pass']})"
        ax_t.semilogy(q, [r["us_per_sample"] for r in pts], "o-", label=label)
        ax_m.semilogy(q, [max(r["peak_rss_delta_bytes"], 4096) / 2**20 for r in pts], "o-", label=label)
    ax_t.set(xlabel="qubits", ylabel="us / sample (median)", title="time per sample")
    ax_m.set(xlabel="qubits", ylabel="peak RSS increase (MiB)", title="peak memory added (VmHWM delta)")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(
        "QShield circuit: full entanglement, enhanced_angle, depth 1; batch shrinks with n (see rows)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
