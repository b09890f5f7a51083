"""Where the residual, the gate and the modulation enter a fused norm block: one stage per
line in the terminal, a small pipeline diagram on the page. The formulas are those of
:mod:`normlab.fused`; this module only names the stages."""

from __future__ import annotations

import html
from dataclasses import dataclass

__all__ = ["Stage", "stages", "stage_lines", "pipeline_svg"]


@dataclass(frozen=True)
class Stage:
    """One step of the block: a short name, its formula and where its inputs come from."""

    name: str
    formula: str
    note: str = ""


def stages(pattern: str, *, rms: bool = False, residual: bool = False, gate: str | None = None,
           norm_before_gate: bool = True, weight_offset: float = 0.0, modulation: str | None = None,
           params: str | None = None) -> tuple[Stage, ...]:
    """The stages of a fused block in the order the data meets them.

    >>> [s.name for s in stages("b t [d]", residual=True, gate="silu", modulation="b d")]
    ['residual', 'statistics', 'normalize', 'modulation', 'gate']
    >>> stages("b t [d]", gate="silu", norm_before_gate=False)[0].formula
    'h = x · silu(z)'
    >>> stages("b [d]", weight_offset=-1.0)[-1].formula
    'y = x̂ · (w − 1)'
    """
    reduced = " ".join(part for part in _reduced(pattern))
    source = "x"
    out: list[Stage] = []
    if residual:
        out.append(Stage("residual", "s = x + r", "s is returned too: the residual stream carries it on"))
        source = "s"
    if gate and not norm_before_gate:
        out.append(Stage("gate", f"h = {source} · {gate}(z)", "before the statistics (norm_before_gate=False)"))
        source = "h"
    what = f"mean({source}²)" if rms else "mean and variance"
    out.append(Stage("statistics", f"{what} of {source} over [{reduced}]", "one pair per group, float64"))
    centred = f"{source}" if rms else f"({source} − mean)"
    out.append(Stage("normalize", f"x̂ = {centred} · rstd"))
    sign = "−" if weight_offset < 0 else "+"  # (w − 1), not (w + -1)
    weight = "(1 + w)" if weight_offset == 1.0 else f"(w {sign} {abs(weight_offset):g})" if weight_offset else "w"
    target = "y₀" if gate and norm_before_gate else "y"
    # an offset implies a weight (Gemma's 1 + w), with or without params named
    affine = f"{target} = x̂ · {weight}" if params or weight_offset else f"{target} = x̂"
    if modulation:
        out.append(Stage("modulation", f"{affine} · (1 + scale) + shift" + (" + b" if params else ""),
                         f"scale and shift per ({', '.join(modulation.split())})"))
    elif params:
        out.append(Stage("affine", f"{affine} + b", f"w and b per ({', '.join(params.split())})"))
    elif weight_offset:
        out.append(Stage("weight", affine, f"the weight offset by {weight_offset:g}"))
    if gate and norm_before_gate:
        out.append(Stage("gate", f"y = y₀ · {gate}(z)", "after the norm, bias included (norm_before_gate=True)"))
    return tuple(out)


def _reduced(pattern: str) -> list[str]:
    from normlab.notation import parse_pattern

    parsed = parse_pattern(pattern)
    names = []
    for dim in parsed.dims:
        if dim.is_ellipsis:
            if dim.reduced:
                names.append("...")
            continue
        names += [a.name for a in dim.factors if a.reduced]
    return names


def stage_lines(block: tuple[Stage, ...]) -> list[str]:
    """One plain line per stage: number, name, formula, note.

    >>> stage_lines(stages("b [d]", residual=True))[0]
    '  1  residual    s = x + r                           s is returned too: the residual stream carries it on'
    """
    return [f"  {k}  {s.name:<11} {s.formula:<35} {s.note}".rstrip() for k, s in enumerate(block, 1)]


def pipeline_svg(block: tuple[Stage, ...]) -> str:
    """The stages as boxes joined by arrows, left to right, in one self-contained SVG."""
    box_w, box_h, gap = 230, 64, 26
    width = len(block) * (box_w + gap) - gap + 20
    parts = [f'<svg class="pipeline" viewBox="0 0 {width} {box_h + 20}" width="{width}" height="{box_h + 20}" '
             'style="max-width:100%;height:auto" role="img" aria-label="pipeline of the fused block">',
             '<defs><marker id="pipe-head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#5b6170"/></marker></defs>']
    for k, stage in enumerate(block):
        x = 10 + k * (box_w + gap)
        enters = stage.name in ("residual", "gate", "modulation")
        parts.append(f'<g class="stage{" enters" if enters else ""}" data-stage="{html.escape(stage.name)}">'
                     f'<rect x="{x}" y="10" width="{box_w}" height="{box_h}" rx="8" '
                     f'fill="{"#fff4d6" if enters else "#ffffff"}" stroke="#5b6170"/>'
                     f'<text x="{x + box_w / 2}" y="32" text-anchor="middle" font-weight="bold">'
                     f'{html.escape(stage.name)}</text>'
                     f'<text x="{x + box_w / 2}" y="54" text-anchor="middle" font-size="11">'
                     f'{html.escape(stage.formula)}</text><title>{html.escape(stage.note)}</title></g>')
        if k:
            parts.append(f'<line x1="{x - gap}" y1="{10 + box_h / 2}" x2="{x - 2}" y2="{10 + box_h / 2}" '
                         'stroke="#5b6170" marker-end="url(#pipe-head)"/>')
    parts.append("</svg>")
    return "".join(parts)
