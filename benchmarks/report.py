"""The Markdown table and the PNG chart of a results dictionary (see run.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

STATE = {True: "met", False: "**missed**", None: "not measured"}


def _machine_line(m: dict) -> str:
    mem = f", {m['memory_gb']} GiB" if m.get("memory_gb") else ""
    return (f"{m['date']} · {m['cpu']}, {m['cores']} cores{mem} · {m['os']} · Python {m['python']} · "
            f"{m['openssl']} · paho-mqtt {m['paho']} · mosquitto {m['mosquitto']}")


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    rows = []
    for section in results["sections"].values():
        for t in section.get("targets", []):
            value = "—" if t["value"] is None else f"{t['value']:.2f}"
            rows.append([t["what"], f"{t['op']} {t['limit']:g}", value, STATE[t["met"]] + (f" ({t['note']})" if t.get("note") else "")])
    return _table(["target", "wanted", "measured", ""], rows) if rows else ""


def markdown(results: dict, chart: Optional[Path] = None) -> str:
    m = results["machine"]
    out = [f"# lightclient benchmarks ({results['mode']} run)", "", f"Machine: {_machine_line(m)}", ""]
    if results["mode"] != "full":
        out += ["**Smoke run: tiny counts, only to check that every benchmark still runs. The numbers mean "
                "nothing.**", ""]
    if chart is not None:
        out += [f"![benchmarks]({chart.name})", ""]
    tt = targets_table(results)
    if tt:
        out += ["## Targets", "", tt, ""]
    for section in results["sections"].values():
        out += [f"## {section['title']}", ""]
        if section.get("error"):
            out += [f"**This benchmark crashed:** `{section['error']}`", ""]
            continue
        if section.get("rows"):
            out += [_table(section["header"], section["rows"]), ""]
        for note in section.get("notes", []):
            out += [f"- {note}"]
        out += ["", f"<sub>{section.get('date', '')}, {section.get('seconds', 0):.0f} s</sub>", ""]
    return "\n".join(out).rstrip() + "\n"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    del matplotlib
    return True


def write_chart(results: dict, path: Path) -> Optional[Path]:
    """A grid of bar charts, one per measured quantity; None without matplotlib (the bench extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    charts = [c for s in results["sections"].values() for c in s.get("charts", [])]
    if not charts:
        return None
    cols = 3
    rows = (len(charts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    palette = {"lightclient": "#2a7ab9", "raw paho": "#8c8c8c", "bare paho": "#8c8c8c", "paho-mqtt": "#8c8c8c",
               "azure-iot-device": "#d9822b"}
    for ax, chart in zip(axes.flat, charts):
        labels = [b[0] for b in chart["bars"]]
        values = [b[1] for b in chart["bars"]]
        colors = [next((c for k, c in palette.items() if label.startswith(k)), "#5a9e6f") for label in labels]
        bars = ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        better = f" ({chart['better']} is better)" if chart.get("better") else ""
        ax.set_title(chart["title"], fontsize=9)
        ax.set_xlabel(f"{chart['unit']}{better}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        top = max(values) if values else 1
        for bar, value in zip(bars, values):
            text = f"{value:,.0f}" if value >= 100 else f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"
            ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=7)
        ax.set_xlim(0, top * 1.22)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(charts):]:
        ax.axis("off")
    m = results["machine"]
    fig.suptitle(f"lightclient benchmarks · {m['date']} · {m['cpu']}, {m['cores']} cores · Python {m['python']}"
                 + (" · SMOKE RUN (meaningless numbers)" if results["mode"] != "full" else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
