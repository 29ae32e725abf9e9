"""A run report for people: `report.md` and `report.png` beside `barber_report.json`.

`write_report_files(out_dir)` reads the run's JSON report and writes both files through temporaries
(`barber.writer`): the Markdown has the settings, totals, bytes, quality and a per-block table; the
picture (`plot`, headless matplotlib, `PNG_SIZE` pixels) has three panels along depth: the
reconstruction loss of each sub-block before and after the rebuild/re-fit, the sparsity of each
linear, and the rebuild's swaps per block. `plot` also draws an output without a run report from
`barber-inspect`'s per-layer sparsity. matplotlib is imported only here, when a picture is drawn.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from barber.errors import CheckpointError
from barber.layout import REPORT_FILE, REPORT_MD, REPORT_PNG
from barber.writer import write_bytes_atomic

__all__ = ["PNG_SIZE", "REPORT_MD", "REPORT_PNG", "plot", "render_markdown", "write_report_files"]

#: (width, height) of report.png in pixels.
PNG_SIZE = (1200, 1200)
_DPI = 100
_EXPERT = re.compile(r"experts\.\d+\.")  # a routed expert's prefix in a linear's name


def _subblock_losses(report: dict) -> dict[str, list[tuple[int, float | None, float]]]:
    """sub-block kind -> [(block, loss before, loss after)] along depth."""
    out: dict[str, list] = {}
    for block in report.get("blocks", []):
        for sub in block.get("subblocks", []):
            out.setdefault(sub["subblock"], []).append((block["block"], sub.get("loss_before"), sub["loss_after"]))
    return out


def _layer_sparsity(report: dict) -> dict[str, list[tuple[int, float]]]:
    """linear (block-local name) -> [(block, sparsity)] along depth."""
    out: dict[str, list] = {}
    for block in report.get("blocks", []):
        for local, stats in block.get("layers", {}).items():
            out.setdefault(local, []).append((block["block"], stats["sparsity"]))
    return out


def _by_kind(sparsity: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """The routed experts' linears averaged per kind (``experts.*.w1 (mean)``), so that a block of 128
    experts draws three lines, not 384; every other linear as it is."""
    groups: dict[str, dict[int, list[float]]] = {}
    for local, rows in sparsity.items():
        key = _EXPERT.sub("experts.*.", local)
        key = key + " (mean)" if key != local else key
        for block, value in rows:
            groups.setdefault(key, {}).setdefault(block, []).append(value)
    return {k: [(b, sum(v) / len(v)) for b, v in sorted(by_block.items())] for k, by_block in groups.items()}


def _swaps(report: dict) -> dict[str, list[tuple[int, int]]]:
    """sub-block kind -> [(block, swaps)] along depth."""
    out: dict[str, list] = {}
    for block in report.get("blocks", []):
        for sub in block.get("subblocks", []):
            out.setdefault(sub["subblock"], []).append((block["block"], sum(sub.get("swaps", {}).values())))
    return out


def plot(path: Path, report: dict | None = None, sparsity: dict[str, list[tuple[int, float]]] | None = None,
         title: str = "") -> None:
    """Draw report.png into `path`: from a run report, or (no report) from per-linear `sparsity` along depth."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PNG_SIZE[0] / _DPI, PNG_SIZE[1] / _DPI), dpi=_DPI)
    loss_ax, sparsity_ax, swaps_ax = fig.subplots(3, 1)
    fig.suptitle(title or "barber run report")
    if report:
        for kind, rows in _subblock_losses(report).items():
            blocks = [b for b, _, _ in rows]
            before = [(b, lb) for b, lb, _ in rows if lb is not None]
            if before:
                loss_ax.plot(*zip(*before), "--o", ms=3, label=f"{kind}: initial mask")
            loss_ax.plot(blocks, [la for _, _, la in rows], "-o", ms=3, label=f"{kind}: final")
        if _subblock_losses(report):
            loss_ax.set_yscale("log")
            loss_ax.legend(fontsize=8)
        sparsity = _layer_sparsity(report)
        width = 0.4
        if report.get("swaps"):
            for k, (kind, rows) in enumerate(_swaps(report).items()):
                swaps_ax.bar([b + (k - 0.5) * width for b, _ in rows], [s for _, s in rows], width, label=kind)
            swaps_ax.legend(fontsize=8)
        else:
            swaps_ax.text(0.5, 0.5, "no swaps (the rebuild was off)" if not report.get("settings", {}).get("rebuild")
                          else "no swaps", ha="center", va="center", transform=swaps_ax.transAxes)
    else:
        for ax in (loss_ax, swaps_ax):
            ax.text(0.5, 0.5, "no run report (barber_report.json)", ha="center", va="center", transform=ax.transAxes)
    loss_ax.set(title="reconstruction loss of each sub-block (before and after the rebuild / re-fit)",
                xlabel="block", ylabel="MSE against the dense sub-block")
    for local, rows in _by_kind(sparsity or {}).items():
        sparsity_ax.plot(*zip(*rows), "-o", ms=3, label=local)
    if sparsity:
        sparsity_ax.legend(fontsize=7, ncol=4)
    sparsity_ax.set(title="sparsity of each linear", xlabel="block", ylabel="fraction pruned")
    swaps_ax.set(title="rebuild swaps per block", xlabel="block", ylabel="swaps")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    write_bytes_atomic(Path(path), buf.getvalue())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def render_markdown(report: dict, png: str | None = REPORT_PNG) -> str:
    """report.md's text: settings, totals, bytes, quality, and a per-block table of losses, sparsity, swaps."""
    s, cal = report.get("settings", {}), report.get("calibration", {})
    lines = [f"# barber run: {Path(report.get('input', '?')).name} ({report.get('family')})", ""]
    lines += [f"- pattern **{s.get('pattern')}**, sparsity {report.get('sparsity', 0):.4f} "
              f"(rows {report.get('row_sparsity', [0, 0])[0]:.4f} to {report.get('row_sparsity', [0, 0])[1]:.4f})",
              f"- initial mask {s.get('init')}, rebuild {s.get('rebuild')} (alpha {s.get('ratio')}, "
              f"{s.get('granularity')}), re-fit {s.get('reconstruct')}: {report.get('swaps', 0)} swaps",
              f"- calibration: {cal.get('nsamples')} windows of {cal.get('seqlen')} tokens from "
              f"`{cal.get('source', '?')}` (seed {cal.get('seed', '?')})",
              f"- time {report.get('seconds', {}).get('total', 0):.1f} s, peak RSS "
              f"{report.get('peak_rss', 0) / 2**30:.2f} GiB, barber {report.get('barber_version')}"]
    save = report.get("save")
    if save and save.get("dense_bytes"):
        lines.append(f"- stored {save['format']} ({save.get('dtype') or 'input dtypes'}): "
                     f"{_mb(report.get('output_bytes', 0))}, {report.get('output_bytes', 0) / save['dense_bytes']:.3f}"
                     f" of dense ({_mb(save['dense_bytes'])})")
    else:
        lines.append(f"- stored dense: {_mb(report.get('output_bytes', 0))}")
    for kind, result in (report.get("eval") or {}).items():
        if result:
            lines.append(f"- {kind} perplexity **{result['ppl']:.4f}** ({result['n_windows']} windows)")
    if png:
        lines += ["", f"![losses, sparsity and swaps along depth]({png})"]
    lines += ["", "| block | sub-block | loss before | loss after | swaps | sparsity |", "|---|---|---|---|---|---|"]
    for block in report.get("blocks", []):
        for sub in block.get("subblocks", []):
            own = {**sub.get("swaps", {}), **(sub.get("reconstruct") or {}).get("relative_error", {})}
            locals_ = [n for n in block.get("layers", {}) if n in own] or list(block.get("layers", {}))
            sp = [block["layers"][n]["sparsity"] for n in locals_ if n in block.get("layers", {})]
            before = sub.get("loss_before")
            lines.append(f"| {block['block']} | {sub['subblock']} | {'-' if before is None else f'{before:.4g}'} | "
                         f"{sub['loss_after']:.4g} | {sum(sub.get('swaps', {}).values())} | "
                         f"{(sum(sp) / len(sp)) if sp else 0:.4f} |")
    return "\n".join(lines) + "\n"


def read_run_report(out_dir: Path) -> dict:
    """The JSON report of the run in `out_dir` (CheckpointError when missing or unreadable)."""
    try:
        report = json.loads((Path(out_dir) / REPORT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{out_dir}: no {REPORT_FILE} (not a finished barber output)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(out_dir) / REPORT_FILE}: unreadable ({type(exc).__name__})") from None
    if not isinstance(report, dict):
        raise CheckpointError(f"{Path(out_dir) / REPORT_FILE}: not a JSON object")
    return report


def write_report_files(out_dir: str | Path, png: bool = True) -> list[Path]:
    """Write report.md (and report.png) from `out_dir`'s barber_report.json; returns the paths written.

    Without matplotlib the picture is left out (and the Markdown does not link it).
    """
    out_dir = Path(out_dir)
    report = read_run_report(out_dir)
    written = []
    if png:
        try:
            plot(out_dir / REPORT_PNG, report, title=f"barber: {Path(report.get('input', '')).name}")
            written.append(out_dir / REPORT_PNG)
        except ImportError:
            png = False
    write_bytes_atomic(out_dir / REPORT_MD, render_markdown(report, REPORT_PNG if png else None).encode())
    return [out_dir / REPORT_MD, *written]
