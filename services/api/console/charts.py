"""Charts drawn on the server as SVG: no chart library in the browser, nothing fetched, and a
page that reads the same with scripts off. Styling comes from console.css by class name, so the
page's Content-Security-Policy can forbid inline styles.

Coordinates: data space -> a plot area inside MARGIN; y grows downward in SVG, hence the flips.
"""

from dataclasses import dataclass, field
from html import escape

import numpy as np
from markupsafe import Markup
from matplotlib.ticker import MaxNLocator
from numpy.typing import NDArray

# Tableau's ten colours: distinct for the classes of a typical project.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 130, 24, 40
# Past this many points a series is drawn as its line and whiskers only: a marker with a tooltip
# per point made a 200-model project's page 1.4 MB of SVG.
MARKER_LIMIT = 60


@dataclass(frozen=True)
class Point:
    """x, y in data units; low/high: the y interval drawn as a whisker (None: none drawn).
    kind: extra CSS classes of the marker (e.g. the model's promotion); title: its tooltip.
    on_line: False for a marker that is not a measurement (drawn, but not joined by the line)."""

    x: float
    y: float
    low: float | None = None
    high: float | None = None
    kind: str = ""
    title: str = ""
    version: int | None = None
    on_line: bool = True


@dataclass(frozen=True)
class Series:
    name: str
    points: list[Point] = field(default_factory=list)
    color: str = PALETTE[0]


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _ticks(low: float, high: float, *, integer: bool) -> list[float]:
    values = MaxNLocator(nbins=6, integer=integer).tick_values(low, high)
    return [float(v) for v in values if low - 1e-9 <= v <= high + 1e-9]


def _label(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def line_chart(
    series: list[Series],
    *,
    name: str,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] = (0.0, 1.0),
    width: int = 640,
    height: int = 280,
    markers: bool | None = None,
) -> Markup:
    """Lines through each series' points (sorted by x), a whisker per interval (one path per
    series), a marker per point (class "point", with data-version when the point is a model)
    unless `markers` is False or, by default, the series has over MARKER_LIMIT points; a legend
    on the right."""
    xs = [p.x for s in series for p in s.points]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = y_range
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM

    def sx(x: float) -> float:
        return MARGIN_LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        clipped = min(max(y, y_low), y_high)
        return MARGIN_TOP + (1 - (clipped - y_low) / (y_high - y_low)) * plot_h

    def screen_x(values: list[float]) -> NDArray[np.float64]:
        return (
            MARGIN_LEFT + (np.asarray(values, dtype=np.float64) - x_low) / (x_high - x_low) * plot_w
        )

    def screen_y(values: list[float | None]) -> NDArray[np.float64]:
        clipped = np.clip(np.asarray(values, dtype=np.float64), y_low, y_high)
        return MARGIN_TOP + (1 - (clipped - y_low) / (y_high - y_low)) * plot_h

    parts = [
        f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    parts.extend(
        f'<line class="grid" x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" '
        f'y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
        f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{sy(y) + 4:.1f}" '
        f'text-anchor="end">{_label(y)}</text>'
        for y in _ticks(y_low, y_high, integer=False)
    )
    parts.extend(
        f'<text class="tick" x="{sx(x):.1f}" y="{MARGIN_TOP + plot_h + 16}" '
        f'text-anchor="middle">{_label(x)}</text>'
        for x in _ticks(x_low, x_high, integer=True)
    )
    parts.append(
        f'<line class="axis" x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" '
        f'y1="{MARGIN_TOP + plot_h}" y2="{MARGIN_TOP + plot_h}"/>'
        f'<line class="axis" x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT}" y1="{MARGIN_TOP}" '
        f'y2="{MARGIN_TOP + plot_h}"/>'
        f'<text class="axis-label" x="{MARGIN_LEFT + plot_w / 2:.1f}" y="{height - 6}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="axis-label" x="12" y="{MARGIN_TOP + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {MARGIN_TOP + plot_h / 2:.1f})">{escape(y_label)}</text>'
    )
    for index, line in enumerate(series):
        points = sorted(line.points, key=lambda p: p.x)
        measured = [p for p in points if p.on_line]
        if len(measured) > 1:
            # Coordinates in one numpy pass: per-point calls were most of a 200-model page.
            xy = np.column_stack(
                [screen_x([p.x for p in measured]), screen_y([p.y for p in measured])]
            )
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy.tolist())
            parts.append(
                f'<polyline class="series" points="{path}" stroke="{line.color}" fill="none"/>'
            )
        spans = [p for p in points if p.low is not None and p.high is not None]
        ends = np.column_stack(
            [
                screen_x([p.x for p in spans]),
                screen_y([p.low for p in spans]),
                screen_y([p.high for p in spans]),
            ]
        )
        whiskers = " ".join(f"M{x:.1f} {low:.1f}V{high:.1f}" for x, low, high in ends.tolist())
        if whiskers:
            parts.append(f'<path class="whiskers" d="{whiskers}" stroke="{line.color}"/>')
        if markers or (markers is None and len(points) <= MARKER_LIMIT):
            series_name = escape(line.name)
            parts.extend(
                f'<circle class="point {escape(p.kind)}" cx="{sx(p.x):.1f}" '
                f'cy="{sy(p.y):.1f}" r="4" stroke="{line.color}" data-series="{series_name}"'
                + (f' data-version="{p.version}"' if p.version is not None else "")
                + f"><title>{escape(p.title)}</title></circle>"
                for p in points
            )
        legend_y = MARGIN_TOP + 14 * index + 6
        parts.append(
            f'<line x1="{width - MARGIN_RIGHT + 10}" x2="{width - MARGIN_RIGHT + 24}" '
            f'y1="{legend_y}" y2="{legend_y}" stroke="{line.color}" class="legend-line"/>'
            f'<text class="legend" x="{width - MARGIN_RIGHT + 28}" y="{legend_y + 4}">'
            f"{escape(line.name)}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def reliability_chart(bins: list[dict[str, float]], *, title: str, size: int = 260) -> Markup:
    """Accuracy against mean confidence per confidence bin (bar width = the bin), with the
    diagonal a perfectly calibrated model would follow."""
    plot = size - MARGIN_LEFT - 16

    def sx(x: float) -> float:
        return MARGIN_LEFT + x * plot

    def sy(y: float) -> float:
        return MARGIN_TOP + (1 - y) * plot

    parts = [
        f'<svg class="chart" data-chart="reliability" viewBox="0 0 {size} {size + 20}" '
        f'width="{size}" height="{size + 20}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line class="diagonal" x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}"/>',
    ]
    for b in bins:
        top = sy(b["accuracy"])
        parts.append(
            f'<rect class="bin" x="{sx(b["low"]):.1f}" y="{top:.1f}" '
            f'width="{(b["high"] - b["low"]) * plot:.1f}" height="{sy(0) - top:.1f}">'
            f"<title>confidence {b['confidence']:.2f}, accuracy {b['accuracy']:.2f}, "
            f"{int(b['count'])} items</title></rect>"
        )
    parts.extend(
        f'<text class="tick" x="{sx(v):.1f}" y="{sy(0) + 14:.1f}" text-anchor="middle">'
        f"{v:.1f}</text>"
        f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">'
        f"{v:.1f}</text>"
        for v in (0.0, 0.5, 1.0)
    )
    parts.append(
        f'<text class="axis-label" x="{sx(0.5):.1f}" y="{size + 14}" text-anchor="middle">'
        "confidence</text></svg>"
    )
    return Markup("".join(parts))
