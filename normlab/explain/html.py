"""The HTML view: one self-contained page (inline CSS, JS and SVG; nothing from the network).

Python computes everything: the geometry of the picture, and for each norm the group of
every element, the group means and stds, and the outputs, all from the library. The page's
script only shows them: it recolours the cells when the norm changes and highlights the
cells that share statistics with the one under the mouse.

The picture is a grid for 1-D and 2-D data. For 3-D and 4-D data it is the cube of the
GroupNorm paper's figure (Wu & He, 2018): N across, C into the depth, H×W down; each
sample is drawn as its own C×(H·W) sheet so that no cell hides another.

Every cell is an SVG ``<g class="cell">`` with ``data-index`` (its flat C-order index),
``data-pos`` (its position) and ``data-group`` (its group under the norm on show).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass

import numpy as np

from normlab.explain.model import NormView, format_output, format_value, observations

__all__ = ["build_page", "write_page", "page_data", "FILL_PALETTE"]

# Soft fills that keep dark text readable; neighbouring groups differ in hue.
FILL_PALETTE = ("#f4a6a6", "#9fd8a7", "#9ec5f0", "#f7d58b", "#d3b1ec", "#8fd9d4",
                "#f6b98d", "#c3dc8c", "#f2a9d0", "#b7bdf2", "#e3c9a0", "#a9d4f5")


@dataclass(frozen=True)
class Geometry:
    """Where the picture puts each element: an SVG polygon and a text anchor per cell."""

    width: float
    height: float
    polygons: list  # per flat index: list of (x, y) corners
    centers: list  # per flat index: (x, y)
    text_skew: float  # degrees; the cube's side faces are slanted
    decorations: str  # axes, labels and outlines, as SVG
    cell_width: float  # across one cell, where its number is written


def _axes_2d(shape):
    if len(shape) == 1:
        return (1, shape[0]), ("", "D · features")
    return shape, ("N · batch", "F · features")


def grid_geometry(shape: tuple[int, ...]) -> Geometry:
    """A rows × columns grid: rows are the first axis (the batch), columns the second."""
    (rows, cols), (row_label, col_label) = _axes_2d(shape)
    cell_w, cell_h, left, top = 72, 50, 70, 56
    polygons, centers = [], []
    for r in range(rows):
        for c in range(cols):
            x, y = left + c * cell_w, top + r * cell_h
            polygons.append([(x, y), (x + cell_w, y), (x + cell_w, y + cell_h), (x, y + cell_h)])
            centers.append((x + cell_w / 2, y + cell_h / 2))
    right, bottom = left + cols * cell_w, top + rows * cell_h
    parts = [_arrow(left, top - 22, right, top - 22), _label((left + right) / 2, top - 30, col_label)]
    for c in range(cols):
        parts.append(_label(left + (c + 0.5) * cell_w, top - 6, str(c), small=True))
    if row_label:
        parts.append(_arrow(left - 34, top, left - 34, bottom))
        parts.append(_label(left - 44, (top + bottom) / 2, row_label, rotate=-90))
        for r in range(rows):
            parts.append(_label(left - 12, top + (r + 0.5) * cell_h + 4, str(r), small=True))
    return Geometry(right + 30, bottom + 30, polygons, centers, 0.0, "\n".join(parts), cell_w)


def cube_geometry(shape: tuple[int, ...]) -> Geometry:
    """The GroupNorm figure's cube, opened up: one C × (H·W) sheet per sample, side by side."""
    n, c = shape[0], shape[1]
    hw = math.prod(shape[2:])
    depth_x, depth_y, cell_h = 62, 24, 40  # one step along C goes right and up
    gap = 46
    left, top = 84, 70 + c * depth_y
    sheet_w = c * depth_x
    polygons, centers = [], []
    for i in range(n):
        x0 = left + i * (sheet_w + gap)
        for k in range(c):
            for s in range(hw):
                def corner(kk, ss, x0=x0):
                    return (x0 + kk * depth_x, top - kk * depth_y + ss * cell_h)
                polygons.append([corner(k, s), corner(k + 1, s), corner(k + 1, s + 1), corner(k, s + 1)])
                centers.append((x0 + (k + 0.5) * depth_x, top - (k + 0.5) * depth_y + (s + 0.5) * cell_h))
    right = left + n * sheet_w + (n - 1) * gap
    bottom = top + hw * cell_h
    parts = []
    # the cube's outline, dashed, around all the sheets
    front = [(left, top), (right - sheet_w, top), (right - sheet_w, bottom), (left, bottom)]
    back = [(x + sheet_w, y - c * depth_y) for x, y in front]
    outline = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in [front[0], back[0], back[1], back[2]])
    outline += " M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in [front[3], front[2], back[2]])
    outline += f" M{front[1][0]:.1f},{front[1][1]:.1f} L{back[1][0]:.1f},{back[1][1]:.1f}"
    outline += f" M{front[0][0]:.1f},{front[0][1]:.1f} L{front[3][0]:.1f},{front[3][1]:.1f}"
    parts.append(f'<path class="outline" d="{outline}"/>')
    # axes: N along the bottom, C into the depth, H×W down the left edge
    parts.append(_arrow(left, bottom + 26, right - sheet_w + 20, bottom + 26))
    parts.append(_label((left + right - sheet_w) / 2, bottom + 46, "N · batch"))
    for i in range(n):
        parts.append(_label(left + i * (sheet_w + gap) + 8, bottom + 16, f"n={i}", small=True, anchor="start"))
    hw_label = "H × W" if len(shape) == 4 else "H·W · positions"
    tokens = len(shape) == 3  # the NLP and RMS views read (b, t, d): tokens along C, features down
    parts.append(_arrow(left - 34, top, left - 34, bottom))
    parts.append(_label(left - 44, (top + bottom) / 2, hw_label, rotate=-90, nlp="D · features" if tokens else None))
    # C runs into the depth, drawn above the first sheet with a tick over each column
    angle = math.degrees(math.atan2(depth_y, depth_x))
    lift = 30
    parts.append(_arrow(left, top - lift, left + sheet_w, top - lift - c * depth_y))
    parts.append(_label(left + sheet_w / 2 - 10, top - lift - c * depth_y / 2 - 10, "C · channels", rotate=-angle,
                        nlp="T · tokens" if tokens else None))
    for k in range(c):
        parts.append(_label(left + (k + 0.5) * depth_x, top - (k + 0.5) * depth_y - 10,
                            f"c={k}", small=True, rotate=-angle, nlp=f"t={k}" if tokens else None))
    width = right + 50
    return Geometry(width, bottom + 60, polygons, centers, -angle, "\n".join(parts), depth_x)


def _arrow(x1, y1, x2, y2) -> str:
    return f'<line class="axis" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" marker-end="url(#head)"/>'


def _label(x, y, text, small=False, rotate=0.0, anchor="middle", nlp=None) -> str:
    """An axis label; ``nlp`` is its wording in the NLP and RMS views (the page swaps it)."""
    turn = f' transform="rotate({rotate:.1f} {x:.1f} {y:.1f})"' if rotate else ""
    cls = "tick" if small else "axis-label"
    words = "" if nlp is None else f' data-nlp="{html.escape(nlp)}" data-vision="{html.escape(text)}"'
    return (f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{turn}{words}>'
            f'{html.escape(text)}</text>')


def _spelled(view: NormView) -> str:
    """The pattern with its sizes, as one would pass them: ``b (g [c]) [s]  g=1``."""
    sizes = "  ".join(f"{name}={size}" for name, size in view.sizes.items())
    return f"{view.pattern}  {sizes}" if sizes else view.pattern


def _finite(value):
    """JSON has no NaN or Inf; the page writes them as text."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _speaks_of_tokens(view: NormView) -> bool:
    """Whether the legend calls the second axis of 3-D data tokens (it is named ``t``, as in
    the NLP layer norm's and RMS norm's ``b t [d]``), so that the cube should too."""
    from normlab.notation import parse_pattern

    dims = parse_pattern(view.pattern).dims
    return view.x.ndim == 3 and [a.name for a in dims[1].factors] == ["t"]


def page_data(views: list[NormView], selected: str) -> dict:
    """Everything the page shows, as plain JSON: the data and, per norm, the library's results."""
    x = views[0].x
    norms = []
    for view in views:
        mean_text, std_text = view.stat_texts()
        norms.append({
            "key": view.key,
            "label": view.label,
            "pattern": view.pattern,
            "rms": view.rms,
            "sizes": view.sizes,
            "groups": view.groups.ravel().tolist(),
            "groupNames": [view.describe_group(g) for g in range(view.num_groups)],
            "mean": None if view.mean is None else [_finite(m) for m in view.mean],
            "std": [_finite(s) for s in view.std],
            "meanText": mean_text,
            "stdText": std_text,
            "output": [_finite(v) for v in view.y.ravel()],
            "counted": None if view.counted is None else view.counted.ravel().tolist(),
            "segmented": view.segment_axis is not None,
            "tokens": _speaks_of_tokens(view),
            "outputText": [format_output(v) for v in view.y.ravel()],
            "observations": [{"text": o.text, "holds": o.holds, "indices": list(o.indices)} for o in observations(view)],
        })
    return {
        "shape": list(x.shape),
        "values": [_finite(v) for v in x.ravel()],
        "valueText": [format_value(v) for v in x.ravel()],
        "selected": selected,
        "palette": list(FILL_PALETTE),
        "norms": norms,
    }


def _svg(x: np.ndarray, first: NormView) -> str:
    geometry = grid_geometry(x.shape) if x.ndim <= 2 else cube_geometry(x.shape)
    # small tensors are drawn larger, so that a handful of cells fills the card
    scale = min(1.5, max(1.0, 660 / geometry.width))
    cells = []
    groups = first.groups.ravel()
    values = x.ravel()
    for flat, (corners, (cx, cy)) in enumerate(zip(geometry.polygons, geometry.centers)):
        pos = ",".join(str(int(i)) for i in np.unravel_index(flat, x.shape))
        points = " ".join(f"{px:.1f},{py:.1f}" for px, py in corners)
        skew = f" skewY({geometry.text_skew:.1f})" if geometry.text_skew else ""
        fill = FILL_PALETTE[groups[flat] % len(FILL_PALETTE)]
        cells.append(
            f'<g class="cell" data-index="{flat}" data-pos="{pos}" data-group="{groups[flat]}" tabindex="{0 if flat == 0 else -1}" '
            f'role="button" aria-pressed="false">'
            f'<polygon points="{points}" style="fill:{fill}"/>'
            f'<text transform="translate({cx:.1f} {cy:.1f}){skew}" dy="0.35em">{html.escape(format_value(values[flat]))}</text></g>'
        )
    return (
        f'<svg id="tensor" viewBox="0 0 {geometry.width:.0f} {geometry.height:.0f}" data-cell-width="{geometry.cell_width}" '
        f'style="width:{geometry.width * scale:.0f}px; min-width:{geometry.width * 0.7:.0f}px" role="group" aria-label="the tensor, one cell per element">'
        '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#5b6170"/></marker></defs>'
        f'{geometry.decorations}<g id="cells">{"".join(cells)}</g></svg>'
    )


def _mask_note(view: NormView) -> str:
    """Where the mask enters, in words (the picture only greys the cells it leaves out)."""
    if view.counted is None:
        return ""
    if view.counted.all():
        return ('\n    <p class="explain" id="mask-note">The mask counts every element '
                f"({view.counted.size} of {view.counted.size}): the same as no mask.</p>")
    return ('\n    <p class="explain" id="mask-note">Grey cells are masked out: each is normalized with its '
            f"group's statistics, but not counted in them ({int(view.counted.sum())} of {view.counted.size} "
            "counted).</p>")


def build_page(views: list[NormView], selected: str | None = None, title: str = "normlab explain",
               pipeline: str = "", note: str = "") -> str:
    """The whole page for one tensor and several norms (``views``, all on the same data);
    ``pipeline`` is an SVG of a fused block's stages (:mod:`normlab.explain.pipeline`), or empty;
    ``note`` a sentence about the data shown under the picture (float32's rounding), or empty."""
    selected = selected or views[0].key
    first = next(v for v in views if v.key == selected)
    x = first.x
    data = json.dumps(page_data(views, selected), separators=(",", ":")).replace("</", "<\\/")
    buttons = "".join(
        f'<button type="button" class="norm" data-norm="{html.escape(v.key)}" aria-pressed="false">'
        f'<span class="name">{html.escape(v.label)}</span><code>{html.escape(_spelled(v))}</code></button>'
        for v in views
    )
    shape = " × ".join(str(s) for s in x.shape)
    return (PAGE_TEMPLATE
            .replace("{{title}}", html.escape(title))
            .replace("{{shape}}", html.escape(shape))
            .replace("{{buttons}}", buttons)
            .replace("{{svg}}", _svg(x, first))
            .replace("{{mask_note}}", _mask_note(first) + (f'\n    <p class="explain" id="data-note">'
                                                             f'{html.escape(note)}.</p>' if note else ""))
            .replace("{{pipeline}}", f'<figure class="card">{pipeline}<figcaption class="explain">where the '
                     'residual, the gate and the modulation enter</figcaption></figure>' if pipeline else "")
            .replace("{{data}}", data))


def write_page(path, views: list[NormView], selected: str | None = None, title: str = "normlab explain",
               pipeline: str = "", note: str = ""):
    """Write :func:`build_page` to ``path`` (UTF-8) and return the path as a ``pathlib.Path``."""
    from pathlib import Path

    path = Path(path)
    try:
        path.write_text(build_page(views, selected, title, pipeline, note), encoding="utf-8")
    except OSError as err:
        from normlab.errors import NormlabError

        raise NormlabError(f"cannot write the page to {str(path)!r}: {err.strerror}; pass --html with a writable path") from None
    return path


PAGE_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>
  :root { --ink:#1d2230; --muted:#5b6170; --line:#d9dce3; --bg:#f7f7f4; --card:#ffffff; --accent:#2f5bd3; }
  * { box-sizing: border-box; }
  body { margin:0; background:var(--bg); color:var(--ink);
         font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header { padding: 18px 28px 6px; }
  h1 { font-size: 21px; margin: 0 0 2px; font-weight: 650; letter-spacing: -0.01em; }
  h1 .brand { color: var(--accent); }
  .lede { margin: 0; color: var(--muted); max-width: 60em; }
  code, .mono { font-family: ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", monospace; }
  nav { display:flex; flex-wrap:wrap; gap:8px; padding: 12px 28px 4px; }
  button.norm { display:flex; flex-direction:column; align-items:flex-start; gap:1px; cursor:pointer;
         border:1px solid var(--line); background:var(--card); border-radius:10px; padding:7px 12px; color:var(--ink);
         font: inherit; transition: border-color .12s, box-shadow .12s; }
  button.norm:hover { border-color:#9aa3b5; }
  button.norm[aria-pressed="true"] { border-color:var(--accent); box-shadow: 0 0 0 2px rgba(47,91,211,.18); }
  button.norm .name { font-weight:600; font-size:14px; }
  button.norm code { font-size:12.5px; color:var(--muted); }
  main { display:grid; grid-template-columns: minmax(0, 1fr) 360px; gap: 18px; padding: 10px 28px 28px; align-items:start; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:14px; padding:14px 16px; }
  .picture { overflow:auto; }
  /* shrink to the card, but never below 70% of the drawn size: a big tensor scrolls instead of
     turning its numbers into dust */
  #tensor { display:block; max-width:100%; height:auto; margin:0 auto; }
  .cell polygon { stroke:#ffffff; stroke-width:1.5; transition: opacity .12s; }
  .cell text { font: 600 15px ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; fill:#1d2230;
               text-anchor:middle; pointer-events:none; }
  .cell { cursor:pointer; outline:none; }
  .cell.excluded text { fill:#8a90a0; font-style:italic; }
  #cells.focus .cell.dim polygon { opacity:.16; }
  #cells.focus .cell.dim text { opacity:.35; }
  .cell.hl polygon { stroke:#1d2230; stroke-width:2.2; }
  .cell.current polygon { stroke-width:3.5; }
  .outline { fill:none; stroke:#b7bcc8; stroke-dasharray: 4 4; }
  .axis { stroke:#5b6170; stroke-width:1.4; }
  .axis-label { font-size:14px; fill:#3a4050; font-weight:600; }
  .tick { font-size:11.5px; fill:#7a8090; }
  .toolbar { display:flex; justify-content:space-between; align-items:center; gap:10px; margin-bottom:6px; color:var(--muted); font-size:13.5px; }
  .toggle { display:inline-flex; border:1px solid var(--line); border-radius:8px; overflow:hidden; }
  .toggle button { border:0; background:transparent; padding:4px 10px; font:inherit; cursor:pointer; color:var(--muted); }
  .toggle button[aria-pressed="true"] { background:var(--ink); color:#fff; }
  aside h2 { font-size:13px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:0 0 8px; font-weight:600; }
  #info .empty { color:var(--muted); }
  #info dl { display:grid; grid-template-columns: auto 1fr; gap: 3px 12px; margin: 0; }
  #info dt { color:var(--muted); }
  #info dd { margin:0; font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
  #info .groupname { font-weight:600; margin-bottom:8px; display:flex; align-items:center; gap:8px; }
  .swatch { display:inline-block; width:14px; height:14px; border-radius:4px; border:1px solid rgba(0,0,0,.15); flex:none; }
  #legend { list-style:none; padding:0; margin:0; max-height: 30vh; overflow:auto; }
  #legend li { display:flex; gap:8px; align-items:center; padding:3px 4px; border-radius:6px; cursor:pointer; font-size:13.5px; }
  #legend li:hover, #legend li.hl { background:#eef1f7; }
  #legend .gname { flex:1; }
  #legend .stats { white-space:nowrap; color:var(--muted); font-size:12px; }
  aside .card + .card { margin-top: 14px; }
  #observations { list-style:none; padding:0; margin:0; font-size:13.5px; max-height: 34vh; overflow:auto; }
  #observations li.none { padding-left:0; color:var(--muted); }
  #observations li.none::before { content:""; }
  #observations li { padding: 3px 4px 3px 22px; position:relative; border-radius:6px; cursor:default; }
  #observations li[data-claim]:hover { background:#eef1f7; }
  #observations li::before { content:"✓"; position:absolute; left:2px; color:#1f9d55; font-weight:700; }
  #observations li.fails::before { content:"✗"; color:#c53030; }
  .explain { color:var(--muted); font-size:14px; margin:8px 0 0; }
  @media (max-width: 1000px) { main { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<header>
  <h1><span class="brand">normlab</span> · which elements share statistics</h1>
  <p class="lede">Every norm subtracts a mean and divides by a standard deviation; they differ only in
  <em>which</em> elements share them. Tensor <b class="mono">{{shape}}</b>, one colour per group:
  hover or click a cell to light up every cell that shares its mean and std.</p>
  {{pipeline}}
</header>
<nav id="norms" aria-label="norm">{{buttons}}</nav>
<main>
  <section class="card picture">
    <div class="toolbar"><span id="summary"></span>
      <span class="toggle" role="group" aria-label="cell values">
        <button type="button" data-show="input" aria-pressed="true">input</button>
        <button type="button" data-show="output" aria-pressed="false">normalized</button>
      </span></div>
    {{svg}}
    <p class="explain" id="pattern-explain"></p>{{mask_note}}
  </section>
  <aside>
    <div class="card" id="info" aria-live="polite"><h2>Cell</h2><p class="empty">Hover or click a cell.</p></div>
    <div class="card"><h2>Groups</h2><ul id="legend"></ul></div>
    <div class="card"><h2>What to notice</h2><ul id="observations"></ul></div>
  </aside>
</main>
<script type="application/json" id="normlab-data">{{data}}</script>
<script>
"use strict";
(function () {
  // Everything shown here was computed by normlab in Python; this script only displays it.
  const data = JSON.parse(document.getElementById("normlab-data").textContent);
  const cellsGroup = document.getElementById("cells");
  const cells = Array.from(document.querySelectorAll("#cells .cell"));
  const svg = document.getElementById("tensor");
  let norm = data.norms.find(n => n.key === data.selected) || data.norms[0];
  let pinned = null;   // the flat index clicked, or null
  let showing = "input";
  const room = +svg.dataset.cellWidth - 8;  // a cell's width for its number, less a margin

  const color = g => data.palette[g % data.palette.length];
  const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

  function members(group) {
    const out = [];
    norm.groups.forEach((g, i) => { if (g === group) out.push(i); });
    return out;
  }

  function paint() {
    cells.forEach(cell => {
      const i = +cell.dataset.index;
      const g = norm.groups[i];
      cell.dataset.group = g;
      const excluded = norm.counted !== null && !norm.counted[i];  // masked out: greyed
      cell.classList.toggle("excluded", excluded);
      cell.querySelector("polygon").style.fill = excluded ? "#d5d8de" : color(g);
      const shown = showing === "input" ? data.valueText[i] : norm.outputText[i];
      const text = cell.querySelector("text");
      text.textContent = shown;
      // a long number shrinks to fit its cell (monospace digits are about 0.6 em wide) rather
      // than run under its neighbour, which would hide its last digits
      text.style.fontSize = Math.min(showing === "input" ? 15 : 12, room / (0.62 * shown.length)) + "px";
      // what a screen reader says on reaching the cell: the drawing alone tells it nothing
      cell.setAttribute("aria-label", "[" + cell.dataset.pos.split(",").join(", ") + "] " + shown + ", " +
        norm.groupNames[g] + (excluded ? ", masked out" : ""));
    });
    svg.classList.toggle("showing-output", showing === "output");
    const nlp = norm.tokens;  // the cube names its axes as the legend does
    svg.querySelectorAll("[data-nlp]").forEach(el => { el.textContent = nlp ? el.dataset.nlp : el.dataset.vision; });
    document.querySelectorAll("button.norm").forEach(b => b.setAttribute("aria-pressed", String(b.dataset.norm === norm.key)));
    const count = norm.groupNames.length;
    const size = norm.groups.length / count;
    document.getElementById("summary").textContent = count + (count === 1 ? " group" : " groups") +
      (norm.segmented ? " (split by the segment ids)" : " of " + size + " elements") + " · " + norm.label;
    document.getElementById("pattern-explain").innerHTML =
      "<code>" + esc(norm.pattern) + Object.entries(norm.sizes).map(([k, v]) => "  " + k + "=" + v).join("") + "</code>: elements that differ only along the axes in <code>[ ]</code>" +
      (norm.segmented ? " and carry the same segment id" : "") + " share one " +
      (norm.rms ? "root mean square (RMS norm has no mean)." : "mean and one std.") +
      (norm.segmented ? " The segment ids split this pattern's groups alone; the other buttons take none." : "");
    const legend = document.getElementById("legend");
    legend.innerHTML = norm.groupNames.map((name, g) =>
      '<li data-group="' + g + '" tabindex="0"><span class="swatch" style="background:' + color(g) + '"></span><span class="gname">' + esc(name) + '</span>' +
      '<span class="stats mono">' + (norm.mean ? "μ " + norm.meanText[g] + " · " : "") +
      (norm.rms ? "rms " : "σ ") + norm.stdText[g] + "</span></li>").join("");
    document.getElementById("observations").innerHTML = norm.observations.length ? norm.observations.map((o, k) =>
      '<li class="' + (o.holds ? "holds" : "fails") + '" data-claim="' + k + '" tabindex="0">' + esc(o.text) + "</li>").join("") :
      '<li class="none">No equal values, means or mirror pairs in this grouping.</li>';
  }

  function highlight(index, groupOnly) {
    const group = groupOnly !== undefined ? groupOnly : norm.groups[index];
    const inGroup = new Set(members(group));
    cellsGroup.classList.add("focus");
    cells.forEach(cell => {
      const i = +cell.dataset.index;
      cell.classList.toggle("hl", inGroup.has(i));
      cell.classList.toggle("dim", !inGroup.has(i));
      cell.classList.toggle("current", i === index);
    });
    document.querySelectorAll("#legend li").forEach(li => li.classList.toggle("hl", +li.dataset.group === group));
    showInfo(index, group, inGroup.size);
  }

  function clear() {
    cellsGroup.classList.remove("focus");
    cells.forEach(cell => cell.classList.remove("hl", "dim", "current"));
    document.querySelectorAll("#legend li").forEach(li => li.classList.remove("hl"));
    document.getElementById("info").innerHTML = '<h2>Cell</h2><p class="empty">Hover or click a cell.</p>';
  }

  function showInfo(index, group, count) {
    const rows = [];
    if (index !== null) {
      rows.push(["position", "[" + cells[index].dataset.pos.split(",").join(", ") + "]"]);
      rows.push(["value", data.valueText[index]]);
    }
    if (norm.mean) rows.push(["group mean", norm.meanText[group]]);
    rows.push([norm.rms ? "group rms" : "group std", norm.stdText[group]]);
    if (index !== null) rows.push(["output", norm.outputText[index]]);
    if (index !== null && norm.counted !== null)
      rows.push(["counted", norm.counted[index] ? "yes" : "no: masked out, normalized with the group's statistics"]);
    rows.push(["shares with", (count - 1) + (count === 2 ? " other cell" : " other cells")]);
    document.getElementById("info").innerHTML =
      '<h2>' + (index !== null ? "Cell" : "Group") + (pinned !== null ? " · pinned (click it or press Enter again to release)" : "") + '</h2>' +
      '<div class="groupname"><span class="swatch" style="background:' + color(group) + '"></span>' + esc(norm.groupNames[group]) + '</div>' +
      "<dl>" + rows.map(r => "<dt>" + esc(r[0]) + "</dt><dd>" + esc(r[1]) + "</dd>").join("") + "</dl>";
  }

  // arrow keys: across the grid's columns or the cube's channels, down its rows or positions
  const across = data.shape.length <= 2 ? 1 : data.shape.slice(2).reduce((a, b) => a * b, 1);
  const down = data.shape.length === 2 ? data.shape[1] : data.shape.length === 1 ? NaN : 1;
  const moves = {ArrowRight: across, ArrowLeft: -across, ArrowDown: down, ArrowUp: -down};
  function rove(index) {  // the cell that Tab comes back to
    cells.forEach(cell => cell.setAttribute("tabindex", +cell.dataset.index === index ? "0" : "-1"));
  }

  cells.forEach(cell => {
    const i = +cell.dataset.index;
    cell.addEventListener("mouseenter", () => { if (pinned === null) highlight(i); });
    cell.addEventListener("focus", () => { if (pinned === null) highlight(i); });
    const pin = () => {
      pinned = (pinned === i) ? null : i;
      cells.forEach(other => other.setAttribute("aria-pressed", String(+other.dataset.index === pinned)));
      highlight(i);
    };
    cell.addEventListener("click", () => { rove(i); pin(); });
    // the keyboard pins as a click does: Tab to a cell, Enter or Space; the arrow keys move
    // among the cells (the picture is one Tab stop, or a big tensor would be thousands)
    cell.addEventListener("keydown", e => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); pin(); return; }
      const to = e.key === "Home" ? 0 : e.key === "End" ? cells.length - 1 : i + (moves[e.key] || NaN);
      if (to >= 0 && to < cells.length) { e.preventDefault(); rove(to); cells[to].focus(); }
    });
  });
  cellsGroup.addEventListener("mouseleave", () => { if (pinned === null) clear(); });
  cellsGroup.addEventListener("focusout", e => {
    if (pinned === null && !(e.relatedTarget && cellsGroup.contains(e.relatedTarget))) clear();
  });
  // legend rows and claims light up their cells on hover and on keyboard focus alike
  const legendList = document.getElementById("legend");
  const showGroup = e => {
    const li = e.target.closest("li");
    if (li && pinned === null) highlight(null, +li.dataset.group);
  };
  legendList.addEventListener("mouseover", showGroup);
  legendList.addEventListener("focusin", showGroup);
  legendList.addEventListener("mouseleave", () => { if (pinned === null) clear(); });
  legendList.addEventListener("focusout", () => { if (pinned === null) clear(); });
  // hovering a claim lights up the cells it is about
  const claims = document.getElementById("observations");
  const showClaim = e => {
    const li = e.target.closest("li[data-claim]");
    if (!li || pinned !== null) return;
    const about = new Set(norm.observations[+li.dataset.claim].indices);
    cellsGroup.classList.add("focus");
    cells.forEach(cell => {
      const i = +cell.dataset.index;
      cell.classList.toggle("hl", about.has(i));
      cell.classList.toggle("dim", !about.has(i));
      cell.classList.remove("current");
    });
  };
  claims.addEventListener("mouseover", showClaim);
  claims.addEventListener("focusin", showClaim);
  claims.addEventListener("mouseleave", () => { if (pinned === null) clear(); });
  claims.addEventListener("focusout", () => { if (pinned === null) clear(); });
  document.querySelectorAll("button.norm").forEach(button => button.addEventListener("click", () => {
    norm = data.norms.find(n => n.key === button.dataset.norm);
    paint();
    if (pinned !== null) highlight(pinned); else clear();
  }));
  document.querySelectorAll(".toggle button").forEach(button => button.addEventListener("click", () => {
    showing = button.dataset.show;
    document.querySelectorAll(".toggle button").forEach(b => b.setAttribute("aria-pressed", String(b === button)));
    paint();
  }));
  paint();
})();
</script>
</body>
</html>
"""
