"""Notebook views of a run: a compact HTML summary with a sparkline per metric, the latest
image of each image key and histogram of each histogram key, and matplotlib plots that
show inline with no `%matplotlib` magic. No matplotlib needed for the HTML (the charts
are inline SVG, images inline PNG)."""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Any, Iterable

from expman._reader.params import flat_params
from expman._storage.layout import KEY, RANK, STEP, TEXT, VALUE

MAX_PARAMS = 30
MAX_METRICS = 50
MAX_MEDIA = 8  # image and histogram keys shown in the summary (the first by name)
MAX_IMAGE_BYTES = 2 << 20  # a larger stored image is listed, not inlined
IMAGE_PX = 160  # shown at most this wide or high (the browser scales; the bytes are the stored ones)
IMAGE_MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp",
              "apng": "image/apng"}
SPARK_POINTS = 80
_W, _H = 120, 24


def sparkline_svg(values: list[float], width: int = _W, height: int = _H) -> str:
    """An inline SVG polyline of the finite values (down-sampled to SPARK_POINTS); "" if none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) > SPARK_POINTS:
        stride = len(finite) / SPARK_POINTS
        finite = [finite[int(i * stride)] for i in range(SPARK_POINTS)] + [finite[-1]]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    dx = width / max(len(finite) - 1, 1)
    points = " ".join(f"{i * dx:.1f},{height - 1 - (v - lo) / span * (height - 2):.1f}" for i, v in enumerate(finite))
    return (f'<svg class="expman-spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.2" points="{points}"/></svg>')


def metric_series(run: Any, keys: Iterable[str] | None = None) -> dict[str, dict[int, dict[str, list[Any]]]]:
    """key -> rank -> {"step": [...], "value": [...], "text": [...]} in arrival order."""
    table = run.metrics(keys)
    out: dict[str, dict[int, dict[str, list[Any]]]] = {}
    columns = [table[c].to_pylist() for c in (KEY, RANK, STEP, VALUE, TEXT)]
    for key, rank, step, value, text in zip(*columns):
        series = out.setdefault(str(key), {}).setdefault(rank, {"step": [], "value": [], "text": []})
        series["step"].append(step)
        series["value"].append(value)
        series["text"].append(text)
    return out


def run_html(run: Any) -> str:
    info = run.info
    ranks = info.get("ranks") or {}
    states: dict[str, int] = {}
    for state in ranks.values():
        states[str(state.get("status", "unknown"))] = states.get(str(state.get("status", "unknown")), 0) + 1
    rank_text = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none yet"
    esc = html.escape
    head = (f'<div class="expman-run"><b>{esc(str(info.get("experiment", "")))}/{esc(str(info.get("name", "")))}</b> '
            f'<code>{esc(str(info.get("id", "")))}</code> · status <b>{esc(str(info.get("status", "unknown")))}</b> · '
            f'ranks {len(ranks)} of {esc(str(info.get("world_size") or len(ranks)))} ({esc(rank_text)})')
    params = list(flat_params(run.params).items())
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(_text(v))}</td></tr>" for k, v in params[:MAX_PARAMS])
    more = f"<tr><td colspan=2>… {len(params) - MAX_PARAMS} more</td></tr>" if len(params) > MAX_PARAMS else ""
    param_html = (f"<details><summary>params ({len(params)})</summary><table>{rows}{more}</table></details>"
                  if params else "<div>params: none</div>")
    metric_rows, keys = _metric_rows(run)
    if keys > MAX_METRICS:
        metric_rows.append(f"<tr><td colspan=5>… {keys - MAX_METRICS} more keys</td></tr>")
    metric_html = ("<table><tr><th>metric</th><th>last</th><th>step</th><th>points</th><th></th></tr>"
                   + "".join(metric_rows) + "</table>") if metric_rows else "<div>metrics: none</div>"
    return f"{head}{param_html}{metric_html}{media_html(run)}</div>"


def media_html(run: Any) -> str:
    """The latest image (or video) of each image key and the latest histogram of each
    histogram key, from the lowest rank that logged it; tables and audio by name. "" when
    the run has no media."""
    from expman._storage.layout import MEDIA_DIR

    path = getattr(run, "path", None)
    if path is None or not (path / MEDIA_DIR).is_dir():
        return ""
    esc = html.escape
    latest: dict[str, dict[str, Any]] = {}
    for row in run.media().to_pylist():  # sorted by key, step, rank
        have = latest.get(row["key"])
        if have is None or row["rank"] <= have["rank"]:  # the lowest rank's last step
            latest[row["key"]] = row
    histograms = _latest_histograms(run)
    cells: list[str] = []
    others: list[str] = []
    for key, row in sorted(latest.items()):
        if row["kind"] in ("image", "video") and len(cells) < MAX_MEDIA:
            cells.append(_image_cell(run, row))
        else:
            others.append(f"{esc(key)} ({esc(row['kind'])})")
    for shown, (key, row) in enumerate(histograms.items()):
        if shown >= MAX_MEDIA:
            others.append(f"{esc(key)} (histogram)")
            continue
        cells.append(f'<figure style="display:inline-block;margin:4px">{histogram_svg(row["edges"], row["counts"])}'
                     f'<figcaption>{esc(key)} · step {_step_text(row["step"])} · rank {row["rank"]}</figcaption></figure>')
    if not cells and not others:
        return ""
    rest = f"<div>also: {', '.join(others)}</div>" if others else ""
    return f"<details open><summary>media ({len(latest) + len(histograms)})</summary>{''.join(cells)}{rest}</details>"


def _step_text(step: Any) -> str:
    return "-" if step is None else str(step)


def _image_cell(run: Any, row: dict[str, Any]) -> str:
    from expman._reader import media as _media

    esc = html.escape
    caption = f"{esc(row['key'])} · step {_step_text(row['step'])} · rank {row['rank']}"
    if row.get("caption"):
        caption += f" · {esc(str(row['caption']))}"
    mime = IMAGE_MIME.get(str(row.get("format") or "").lower())
    if mime is None or (row.get("size") or 0) > MAX_IMAGE_BYTES:
        body = f"<div>({esc(str(row.get('format')))}, {row.get('size')} bytes: run.read_media({row['key']!r}))</div>"
    else:
        try:
            data = _media.read_bytes(run.path, run._files, row, None)
            body = (f'<img src="data:{mime};base64,{base64.b64encode(data).decode()}" '
                    f'style="max-width:{IMAGE_PX}px;max-height:{IMAGE_PX}px;image-rendering:pixelated" '
                    f'alt="{esc(row["key"])}"/>')
        except Exception as exc:  # encrypted without the key, or a damaged object: say so
            body = f"<div>(not shown: {esc(str(exc))})</div>"
    return f'<figure style="display:inline-block;margin:4px">{body}<figcaption>{caption}</figcaption></figure>'


def _latest_histograms(run: Any) -> dict[str, dict[str, Any]]:
    table = run.histograms()
    latest: dict[str, dict[str, Any]] = {}
    if table.num_rows == 0:
        return latest
    for row in table.select(["key", "step", "rank", "edges", "counts"]).to_pylist():
        have = latest.get(row["key"])
        if have is None or row["rank"] <= have["rank"]:
            latest[row["key"]] = row
    return dict(sorted(latest.items()))


def histogram_svg(edges: list[float], counts: list[float], width: int = 160, height: int = 60) -> str:
    """Bars of one histogram as inline SVG, with its value range under it."""
    if not counts:
        return ""
    lo, hi = float(edges[0]), float(edges[-1])
    span = (hi - lo) or 1.0
    peak = max(counts) or 1.0
    bars = "".join(
        f'<rect x="{(float(a) - lo) / span * width:.1f}" y="{height - c / peak * height:.1f}" '
        f'width="{max((float(b) - float(a)) / span * width, 0.5):.1f}" height="{c / peak * height:.1f}"/>'
        for a, b, c in zip(edges[:-1], edges[1:], counts))
    return (f'<svg class="expman-hist" width="{width}" height="{height + 12}" viewBox="0 0 {width} {height + 12}">'
            f'<g fill="#1f77b4">{bars}</g><text x="0" y="{height + 10}" font-size="9">{lo:.4g}</text>'
            f'<text x="{width}" y="{height + 10}" font-size="9" text-anchor="end">{hi:.4g}</text></svg>')


def _metric_rows(run: Any) -> tuple[list[str], int]:
    """One table row per key (the first MAX_METRICS by name): the lowest rank's last value and
    step and its sparkline, and the key's point count; and how many keys there are. Computed
    on Arrow columns with numpy (no Python object per point: a 1.4 M-point run takes ~0.2 s)."""
    import numpy as np

    table = run.metrics(columns=[KEY, VALUE, TEXT, STEP, RANK])
    if table.num_rows == 0:
        return [], 0
    key_col = table.column(KEY).combine_chunks()
    names = key_col.dictionary.to_pylist()
    codes = key_col.indices.to_numpy(zero_copy_only=False)
    ranks = table.column(RANK).to_numpy()
    values = table.column(VALUE).to_numpy()  # nulls (text points) become NaN
    counts = np.bincount(codes, minlength=len(names))
    present = sorted((names[c], c) for c in np.flatnonzero(counts))
    esc = html.escape
    rows = []
    for key, code in present[:MAX_METRICS]:
        of_key = codes == code
        lowest = ranks[of_key].min()  # the lowest rank's series stands for the key
        where = np.flatnonzero(of_key & (ranks == lowest))
        last_at = int(where[-1])
        text = table.column(TEXT)[last_at].as_py()
        last = text if text is not None else table.column(VALUE)[last_at].as_py()
        step = table.column(STEP)[last_at].as_py()
        spark = values[where]
        if len(spark) > 4 * SPARK_POINTS:  # the sparkline samples SPARK_POINTS of them anyway
            spark = np.concatenate([spark[:: len(spark) // (2 * SPARK_POINTS)], spark[-1:]])
        rows.append(
            f"<tr><td>{esc(key)}</td><td>{esc(_text(last))}</td><td>{'-' if step is None else step}</td>"
            f"<td>{int(counts[code])}</td><td>{sparkline_svg(spark.tolist())}</td></tr>")
    return rows, len(present)


def pending_html(label: str) -> str:
    return f'<div class="expman-run"><b>{html.escape(label)}</b> · waiting for the collector to write the run</div>'


def _figure_class() -> type:
    """A matplotlib Figure that shows itself in Jupyter as a PNG (`_repr_png_`): a bare
    Figure made without pyplot has no display hook, and showed as `<Figure size ...>`
    unless `%matplotlib inline` had been run."""
    from matplotlib.figure import Figure

    global _RunFigure
    if _RunFigure is None:
        class RunFigure(Figure):
            def _repr_png_(self) -> bytes:
                import io

                buf = io.BytesIO()
                self.savefig(buf, format="png", dpi=100)
                return buf.getvalue()

        _RunFigure = RunFigure
    return _RunFigure


_RunFigure: type | None = None


def plot(run: Any, keys: str | Iterable[str] | None = None, ranks: Iterable[int] | None = None) -> Any:
    """A matplotlib Figure: one axes per key, one line per rank, value against step. As a
    cell's value it shows as a PNG in Jupyter, with no magic needed."""
    try:
        Figure = _figure_class()
    except ImportError as exc:
        raise ImportError("Run.plot needs matplotlib: pip install matplotlib (or 'expman[notebook]')") from exc
    wanted = [keys] if isinstance(keys, str) else (list(keys) if keys is not None else None)
    series = metric_series(run, wanted)
    names = [k for k in (wanted or sorted(series)) if k in series and any(
        v is not None for s in series[k].values() for v in s["value"])]
    if not names:
        raise ValueError(f"no numeric points for {wanted if wanted is not None else 'any key'} in {run.location}")
    fig = Figure(figsize=(6, 2.2 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    keep = set(ranks) if ranks is not None else None
    for ax, key in zip(axes, names):
        for rank, s in sorted(series[key].items()):
            if keep is not None and rank not in keep:
                continue
            xs = [i if st is None else st for i, st in enumerate(s["step"])]
            ax.plot(xs, [math.nan if v is None else v for v in s["value"]], label=f"rank {rank}", linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if len(series[key]) > 1:
            ax.legend(fontsize=7)
    return fig



def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value)
