"""Dependency-free PNG charts for kdcore's demo (numpy, zlib and struct only).

``write_demo_plot`` draws a line chart (e.g. loss curves) beside a bar chart
(e.g. task success rates) into one RGB image and writes it as a PNG;
``render_png`` encodes any ``(H, W, 3)`` uint8 array as PNG bytes. Text uses a
built-in 5x7 bitmap font that covers printable ASCII; any other character
draws as a small box.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Mapping

import numpy as np

from ._files import atomic_write

__all__ = ["HEIGHT", "PALETTE", "WIDTH", "render_png", "write_demo_plot"]

WIDTH = 1000
HEIGHT = 420
_SPLIT = 610  # x where the bar panel starts

# Series colours, in order: curve i and bar i both use PALETTE[i % len(PALETTE)].
# None of them equals the text, axis, grid or background colours below.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 100, 190),  # blue
    (235, 120, 20),  # orange
    (40, 155, 60),  # green
    (205, 40, 45),  # red
    (125, 80, 180),  # purple
    (0, 150, 155),  # teal
    (145, 90, 50),  # brown
    (210, 70, 165),  # magenta
    (150, 150, 25),  # olive
    (20, 45, 105),  # navy
)
_WHITE = (255, 255, 255)
_TEXT = (25, 25, 25)
_AXIS = (95, 95, 95)
_GRID = (228, 228, 228)
_MINOR = (243, 243, 243)
_MUTED = (140, 140, 140)

_S_TITLE = 3  # font scale of the figure title
_S_PANEL = 2  # panel titles, "no data"
_S_LABEL = 2  # ticks, legend, bar labels (falls back to 1 where space is short)

# --------------------------------------------------------------------------------------------
# Font: one glyph a line, "KEY row row ...": 5 columns a row, '#' ink, '.' blank. Seven rows
# stand on the baseline; glyphs with a descender (g j p q y , ; _) have two rows more.
# KEY is the character itself, except SP for the space.
_FONT_SRC = r"""
SP ..... ..... ..... ..... ..... ..... .....
! ..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..
" .#.#. .#.#. .#.#. ..... ..... ..... .....
# .#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.
$ ..#.. .#### #.#.. .###. ..#.# ####. ..#..
% ##... ##..# ...#. ..#.. .#... #..## ...##
& .##.. #..#. #.#.. .#... #.#.# #..#. .##.#
' ..#.. ..#.. .#... ..... ..... ..... .....
( ...#. ..#.. .#... .#... .#... ..#.. ...#.
) .#... ..#.. ...#. ...#. ...#. ..#.. .#...
* ..... ..#.. #.#.# .###. #.#.# ..#.. .....
+ ..... ..#.. ..#.. ##### ..#.. ..#.. .....
, ..... ..... ..... ..... ..... .##.. .##.. ..#.. .#...
- ..... ..... ..... .###. ..... ..... .....
. ..... ..... ..... ..... ..... .##.. .##..
/ ..... ....# ...#. ..#.. .#... #.... .....
0 .###. #...# #..## #.#.# ##..# #...# .###.
1 ..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.
2 .###. #...# ....# ...#. ..#.. .#... #####
3 ##### ...#. ..#.. ...#. ....# #...# .###.
4 ...#. ..##. .#.#. #..#. ##### ...#. ...#.
5 ##### #.... ####. ....# ....# #...# .###.
6 ..##. .#... #.... ####. #...# #...# .###.
7 ##### ....# ...#. ..#.. .#... .#... .#...
8 .###. #...# #...# .###. #...# #...# .###.
9 .###. #...# #...# .#### ....# ...#. .##..
: ..... .##.. .##.. ..... .##.. .##.. .....
; ..... .##.. .##.. ..... .##.. .##.. ..#.. .#... .....
< ...#. ..#.. .#... #.... .#... ..#.. ...#.
= ..... ..... ##### ..... ##### ..... .....
> .#... ..#.. ...#. ....# ...#. ..#.. .#...
? .###. #...# ....# ...#. ..#.. ..... ..#..
@ .###. #...# ....# .##.# #.#.# #.#.# .###.
A .###. #...# #...# ##### #...# #...# #...#
B ####. #...# #...# ####. #...# #...# ####.
C .###. #...# #.... #.... #.... #...# .###.
D ###.. #..#. #...# #...# #...# #..#. ###..
E ##### #.... #.... ####. #.... #.... #####
F ##### #.... #.... ####. #.... #.... #....
G .###. #...# #.... #.### #...# #...# .####
H #...# #...# #...# ##### #...# #...# #...#
I .###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
J ..### ...#. ...#. ...#. ...#. #..#. .##..
K #...# #..#. #.#.. ##... #.#.. #..#. #...#
L #.... #.... #.... #.... #.... #.... #####
M #...# ##.## #.#.# #.#.# #...# #...# #...#
N #...# #...# ##..# #.#.# #..## #...# #...#
O .###. #...# #...# #...# #...# #...# .###.
P ####. #...# #...# ####. #.... #.... #....
Q .###. #...# #...# #...# #.#.# #..#. .##.#
R ####. #...# #...# ####. #.#.. #..#. #...#
S .#### #.... #.... .###. ....# ....# ####.
T ##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..
U #...# #...# #...# #...# #...# #...# .###.
V #...# #...# #...# #...# #...# .#.#. ..#..
W #...# #...# #...# #.#.# #.#.# #.#.# .#.#.
X #...# #...# .#.#. ..#.. .#.#. #...# #...#
Y #...# #...# .#.#. ..#.. ..#.. ..#.. ..#..
Z ##### ....# ...#. ..#.. .#... #.... #####
[ .###. .#... .#... .#... .#... .#... .###.
\ ..... #.... .#... ..#.. ...#. ....# .....
] .###. ...#. ...#. ...#. ...#. ...#. .###.
^ ..#.. .#.#. #...# ..... ..... ..... .....
_ ..... ..... ..... ..... ..... ..... ..... ..... #####
` .#... ..#.. ..... ..... ..... ..... .....
a ..... ..... .###. ....# .#### #...# .####
b #.... #.... #.##. ##..# #...# #...# ####.
c ..... ..... .###. #.... #.... #...# .###.
d ....# ....# .##.# #..## #...# #...# .####
e ..... ..... .###. #...# ##### #.... .###.
f ..##. .#..# .#... ###.. .#... .#... .#...
g ..... ..... .#### #...# #...# #...# .#### ....# .###.
h #.... #.... #.##. ##..# #...# #...# #...#
i ..#.. ..... .##.. ..#.. ..#.. ..#.. .###.
j ...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..
k #.... #.... #..#. #.#.. ##... #.#.. #..#.
l .##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
m ..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#
n ..... ..... #.##. ##..# #...# #...# #...#
o ..... ..... .###. #...# #...# #...# .###.
p ..... ..... ####. #...# #...# #...# ####. #.... #....
q ..... ..... .#### #...# #...# #...# .#### ....# ....#
r ..... ..... #.##. ##..# #.... #.... #....
s ..... ..... .###. #.... .###. ....# ####.
t .#... .#... ###.. .#... .#... .#..# ..##.
u ..... ..... #...# #...# #...# #..## .##.#
v ..... ..... #...# #...# #...# .#.#. ..#..
w ..... ..... #...# #...# #.#.# #.#.# .#.#.
x ..... ..... #...# .#.#. ..#.. .#.#. #...#
y ..... ..... #...# #...# #...# #...# .#### ....# .###.
z ..... ..... ##### ...#. ..#.. .#... #####
{ ...#. ..#.. ..#.. .#... ..#.. ..#.. ...#.
| ..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..
} .#... ..#.. ..#.. ...#. ..#.. ..#.. .#...
~ ..... ..... .#... #.#.# ...#. ..... .....
"""
_BOX_SRC = "..... ##### #...# #...# #...# ##### ....."  # drawn for unknown characters
_GLYPH_H = 7  # rows above the baseline; text of scale s is 7*s tall, 9*s with descenders
_LINE_H = 9
_ADVANCE = 6  # glyph width plus one blank column


def _parse_glyph(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def _parse_font(src: str) -> dict[str, np.ndarray]:
    font = {}
    for line in src.strip().splitlines():
        key, *rows = line.split()
        font[" " if key == "SP" else key] = _parse_glyph(rows)
    return font


_FONT = _parse_font(_FONT_SRC)
_BOX = _parse_glyph(_BOX_SRC.split())


@functools.lru_cache(maxsize=1024)
def _glyph(ch: str, scale: int) -> np.ndarray:
    g = _FONT.get(ch, _BOX)
    return np.repeat(np.repeat(g, scale, axis=0), scale, axis=1) if scale > 1 else g


def _text_width(text: str, scale: int) -> int:
    return max(0, len(text) * _ADVANCE * scale - scale)


def _fit(text: str, max_px: int, scale: int) -> str:
    """``text``, cut and ended with '..' if wider than ``max_px``."""
    if _text_width(text, scale) <= max_px:
        return text
    n = max(0, (max_px + scale) // (_ADVANCE * scale))
    return text[: n - 2] + ".." if n >= 3 else text[:n]


# --------------------------------------------------------------------------------------------
# Raster primitives. Coordinates are integer pixels, x right, y down; rectangles are half-open.


def _fill(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    h, w = img.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x0 < x1 and y0 < y1:
        img[y0:y1, x0:x1] = color


def _hline(img, x0: int, x1: int, y: int, color) -> None:
    _fill(img, min(x0, x1), y, max(x0, x1) + 1, y + 1, color)


def _vline(img, x: int, y0: int, y1: int, color) -> None:
    _fill(img, x, min(y0, y1), x + 1, max(y0, y1) + 1, color)


def _frame(img, x0: int, y0: int, x1: int, y1: int, color) -> None:
    """A 1 px outline through the corners (x0, y0) and (x1, y1), both inclusive."""
    _hline(img, x0, x1, y0, color)
    _hline(img, x0, x1, y1, color)
    _vline(img, x0, y0, y1, color)
    _vline(img, x1, y0, y1, color)


def _blit(img: np.ndarray, x: int, y: int, mask: np.ndarray, color) -> None:
    h, w = img.shape[:2]
    mh, mw = mask.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + mw, w), min(y + mh, h)
    if x0 < x1 and y0 < y1:
        img[y0:y1, x0:x1][mask[y0 - y : y1 - y, x0 - x : x1 - x]] = color


def _text(img, x: int, y: int, text: str, color, scale: int = 1, align: str = "left") -> None:
    """Draws ``text`` with its top at ``y``; ``x`` is its left, centre or right end."""
    width = _text_width(text, scale)
    if align == "center":
        x -= width // 2
    elif align == "right":
        x -= width
    for i, ch in enumerate(text):
        _blit(img, x + i * _ADVANCE * scale, y, _glyph(ch, scale), color)


def _polyline(img, xs: np.ndarray, ys: np.ndarray, color, clip: tuple[int, int, int, int]):
    """A 2 px thick line through the points (float pixels), kept inside ``clip``."""
    if len(xs) < 2:
        return
    x0, y0 = xs[:-1], ys[:-1]
    dx, dy = np.diff(xs), np.diff(ys)
    n = np.ceil(np.maximum(np.abs(dx), np.abs(dy))).astype(np.int64) + 1
    seg = np.repeat(np.arange(len(n)), n)
    first = np.repeat(np.cumsum(n) - n, n)
    t = (np.arange(int(n.sum())) - first) / np.repeat(np.maximum(n - 1, 1), n)
    px = np.rint(x0[seg] + t * dx[seg]).astype(np.int64)
    py = np.rint(y0[seg] + t * dy[seg]).astype(np.int64)
    cx0, cy0, cx1, cy1 = clip
    for ox in (0, 1):
        for oy in (0, 1):
            qx, qy = px + ox, py + oy
            keep = (qx >= cx0) & (qx < cx1) & (qy >= cy0) & (qy < cy1)
            img[qy[keep], qx[keep]] = color


# --------------------------------------------------------------------------------------------
# Input checking.


def _number(v, what: str) -> float:
    if isinstance(v, (str, bytes, bytearray, bool, np.bool_)):
        raise ValueError(f"{what} must be a number, got {type(v).__name__} {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a number, got {type(v).__name__} {v!r}") from exc


def _clean_curves(curves, y_log: bool) -> list[tuple[str, np.ndarray]]:
    """(name, (n, 2) float64 of the plottable points, y as log10 if ``y_log``) per curve."""
    if not isinstance(curves, Mapping):
        raise ValueError(
            f"curves must be a dict name -> [(step, value), ...], got {type(curves).__name__}"
        )
    out = []
    for name, points in curves.items():
        if isinstance(points, np.ndarray) and points.dtype.kind in "iuf":
            if points.size and (points.ndim != 2 or points.shape[1] != 2):
                raise ValueError(
                    f"curve {name!r}: an array of points must have shape (n, 2), got {points.shape}"
                )
            arr = points.reshape(-1, 2).astype(np.float64)
        else:
            if isinstance(points, (str, bytes, Mapping)):
                raise ValueError(f"curve {name!r}: expected a list of (step, value) pairs")
            try:
                items = list(points)
            except TypeError as exc:
                raise ValueError(
                    f"curve {name!r}: expected a list of (step, value) pairs, "
                    f"got {type(points).__name__}"
                ) from exc
            arr = np.empty((len(items), 2), dtype=np.float64)
            for j, p in enumerate(items):
                if isinstance(p, (str, bytes, Mapping)):
                    raise ValueError(f"curve {name!r} point {j}: expected (step, value), got {p!r}")
                try:
                    step, value = p
                except (TypeError, ValueError) as exc:
                    raise ValueError(
                        f"curve {name!r} point {j}: expected (step, value), got {p!r}"
                    ) from exc
                arr[j, 0] = _number(step, f"curve {name!r} point {j} step")
                arr[j, 1] = _number(value, f"curve {name!r} point {j} value")
        keep = np.isfinite(arr).all(axis=1)
        if y_log:
            keep &= arr[:, 1] > 0
        arr = arr[keep]
        if y_log:
            arr[:, 1] = np.log10(arr[:, 1])
        out.append((str(name), arr))
    return out


def _clean_bars(bars) -> list[tuple[str, float]]:
    if not isinstance(bars, Mapping):
        raise ValueError(f"bars must be a dict name -> value in [0, 1], got {type(bars).__name__}")
    out = []
    for name, value in bars.items():
        v = _number(value, f"bar {name!r}")
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"bar {name!r}: value must be a finite number in [0, 1], got {v!r}")
        out.append((str(name), v))
    return out


# --------------------------------------------------------------------------------------------
# Axis ticks.


def _span(lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) widened around its middle when (nearly) empty."""
    size = max(abs(lo), abs(hi))
    if hi - lo <= max(size * 1e-9, 1e-250):
        pad = size * 0.1 if size > 1e-250 else 1.0
        mid = (lo + hi) / 2
        lo, hi = mid - pad, mid + pad
    if not math.isfinite(hi - lo):
        raise ValueError("curve values span too wide a range to plot")
    return lo, hi


def _fmt_tick(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        v = 0.0
    step_exp = math.floor(math.log10(step) + 1e-9)
    size = max(abs(v), step)
    if size < 1e6 and step_exp >= -4:
        return f"{v:.{max(0, -step_exp)}f}"
    digits = min(12, max(1, math.floor(math.log10(size) + 1e-9) - step_exp + 1))
    s = f"{v:.{digits}g}"
    return s.replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def _linear_ticks(lo: float, hi: float, target: int = 5):
    """(axis lo, axis hi, tick values, labels): round numbers 1, 2 or 5 x 10^k apart."""
    lo, hi = _span(lo, hi)
    raw = (hi - lo) / target
    exp = math.floor(math.log10(raw))
    mult = next(m for m in (1, 2, 5, 10) if m * 10.0**exp >= raw * (1 - 1e-9))
    if mult == 10:
        mult, exp = 1, exp + 1

    def tick(k: int) -> float:  # k * mult * 10**exp, as exactly as a float allows
        return k * mult * 10.0**exp if exp >= 0 else k * mult / 10.0**-exp

    step = tick(1)
    k0 = math.floor(lo / step + 1e-9)
    k1 = max(math.ceil(hi / step - 1e-9), k0 + 1)
    values = [tick(k) for k in range(k0, k1 + 1)]
    labels = [_fmt_tick(v, step) for v in values]
    # The axis spans the outer ticks; an ulp more where rounding left data just outside.
    return min(values[0], lo), max(values[-1], hi), values, labels


def _fmt_pow10(k: int) -> str:
    if 0 <= k <= 5:
        return str(10**k)
    if -4 <= k < 0:
        return f"{10.0**k:.{-k}f}"
    return f"1e{k}"


def _log_ticks(lo: float, hi: float):
    """Like ``_linear_ticks`` for log10 values: whole decades."""
    k0, k1 = math.floor(lo + 1e-9), math.ceil(hi - 1e-9)
    if k1 <= k0:
        k0, k1 = k0 - 1, k1 + 1
    stride = max(1, math.ceil((k1 - k0) / 8))
    k0, k1 = (k0 // stride) * stride, -((-k1) // stride) * stride
    values = list(range(k0, k1 + 1, stride))
    return float(k0), float(k1), [float(k) for k in values], [_fmt_pow10(k) for k in values]


# --------------------------------------------------------------------------------------------
# Panels. A panel box is (x0, y0, x1, y1), half-open.


def _no_data(img, left: int, top: int, right: int, bottom: int) -> None:
    _frame(img, left, top, right, bottom, _AXIS)
    y = (top + bottom) // 2 - _GLYPH_H * _S_PANEL // 2
    _text(img, (left + right) // 2, y, "no data", _MUTED, _S_PANEL, "center")


def _line_panel(img, box, curves: list[tuple[str, np.ndarray]], title: str, y_log: bool):
    bx0, by0, bx1, by1 = box
    s = _S_LABEL
    _text(
        img, (bx0 + bx1) // 2, by0, _fit(title, bx1 - bx0 - 20, _S_PANEL), _TEXT, _S_PANEL, "center"
    )
    top = by0 + _LINE_H * _S_PANEL + 8
    bottom = by1 - 2 * (_LINE_H * s + 4) - 8  # room for the tick labels and the "step" label
    right = bx1 - 20
    filled = [pts for _, pts in curves if len(pts)]
    if not filled:
        _no_data(img, bx0 + 30, top, right, bottom)
        return
    data = np.concatenate(filled)
    xlo, xhi, xticks, xlabels = _linear_ticks(float(data[:, 0].min()), float(data[:, 0].max()))
    ylo, yhi, yticks, ylabels = (_log_ticks if y_log else _linear_ticks)(
        float(data[:, 1].min()), float(data[:, 1].max())
    )
    left = bx0 + 12 + max(_text_width(t, s) for t in ylabels) + 10

    def to_x(v):
        return left + (np.asarray(v) - xlo) / (xhi - xlo) * (right - left)

    def to_y(v):
        return bottom - (np.asarray(v) - ylo) / (yhi - ylo) * (bottom - top)

    # Grid, ticks and their labels.
    label_y = bottom + 8
    last_end = -(10**9)
    for v, label in zip(xticks, xlabels, strict=True):
        x = int(round(float(to_x(v))))
        _vline(img, x, top, bottom, _GRID)
        _vline(img, x, bottom, bottom + 4, _AXIS)
        w = _text_width(label, s)
        if x - w // 2 > last_end + 8:  # skip labels that would overlap the previous one
            _text(img, x, label_y, label, _TEXT, s, "center")
            last_end = x - w // 2 + w
    _text(img, (left + right) // 2, label_y + _LINE_H * s + 4, "step", _MUTED, s, "center")
    if y_log and len(yticks) > 1 and yticks[1] - yticks[0] == 1:  # minor grid at 2..9 x 10^k
        for k in yticks[:-1]:
            for m in range(2, 10):
                _hline(img, left, right, int(round(float(to_y(k + math.log10(m))))), _MINOR)
    for v, label in zip(yticks, ylabels, strict=True):
        y = int(round(float(to_y(v))))
        _hline(img, left, right, y, _GRID)
        _hline(img, left - 4, left, y, _AXIS)
        _text(img, left - 8, y - _GLYPH_H * s // 2, label, _TEXT, s, "right")

    # Curves, drawn inside the frame; sparse ones get a marker at each point.
    before = img.copy()
    clip = (left + 1, top + 1, right, bottom)
    for i, (_, pts) in enumerate(curves):
        if not len(pts):
            continue
        color = PALETTE[i % len(PALETTE)]
        xs, ys = to_x(pts[:, 0]), to_y(pts[:, 1])
        _polyline(img, xs, ys, color, clip)
        if len(pts) <= 20:
            for x, y in zip(np.rint(xs).astype(int), np.rint(ys).astype(int), strict=True):
                _marker(img, int(x), int(y), color, clip)
    _frame(img, left, top, right, bottom, _AXIS)
    _legend(img, curves, (left, top, right, bottom), np.any(img != before, axis=2))


def _marker(img, x: int, y: int, color, clip: tuple[int, int, int, int]) -> None:
    """A 5x5 square centred on (x, y), kept inside ``clip``."""
    cx0, cy0, cx1, cy1 = clip
    _fill(img, max(x - 2, cx0), max(y - 2, cy0), min(x + 3, cx1), min(y + 3, cy1), color)


def _legend(img, curves, plot, ink: np.ndarray) -> None:
    """A boxed legend in the plot corner that covers the fewest curve pixels."""
    left, top, right, bottom = plot
    for s in (_S_LABEL, 1):
        max_name = (right - left) // 2
        names = [_fit(name, max_name, s) for name, _ in curves]
        row = _LINE_H * s + 2
        w = 8 + 20 + 6 + max(_text_width(n, s) for n in names) + 8
        h = 6 + row * len(names) + 2
        if h <= (bottom - top) - 12 or s == 1:
            break
    corners = [
        (right - 8 - w, top + 8),
        (left + 8, top + 8),
        (right - 8 - w, bottom - 8 - h),
        (left + 8, bottom - 8 - h),
    ]
    x0, y0 = min(
        corners, key=lambda c: int(ink[max(c[1], 0) : c[1] + h, max(c[0], 0) : c[0] + w].sum())
    )
    _fill(img, x0, y0, x0 + w, y0 + h, _WHITE)
    _frame(img, x0, y0, x0 + w - 1, y0 + h - 1, _MUTED)
    for i, name in enumerate(names):
        ry = y0 + 6 + i * row
        color = PALETTE[i % len(PALETTE)]
        mid = ry + _GLYPH_H * s // 2
        _fill(img, x0 + 8, mid - 1, x0 + 28, mid + 2, color)
        _text(img, x0 + 34, ry, name, _TEXT, s)


def _bar_panel(img, box, bars: list[tuple[str, float]], title: str) -> None:
    bx0, by0, bx1, by1 = box
    _text(
        img, (bx0 + bx1) // 2, by0, _fit(title, bx1 - bx0 - 20, _S_PANEL), _TEXT, _S_PANEL, "center"
    )
    top = by0 + _LINE_H * _S_PANEL + 8
    right = bx1 - 20
    s = _S_LABEL
    left = bx0 + 12 + _text_width("100%", s) + 10
    bottom = by1 - 2 * (_LINE_H * s + 4) - 8  # as in the line panel; two rows of names fit
    if not bars:
        _no_data(img, left, top, right, bottom)
        return
    one = top + _LINE_H * s + 8  # y of 100%; leaves room for a value label above a full bar
    for k in range(5):
        y = int(round(bottom - k / 4 * (bottom - one)))
        _hline(img, left, right, y, _GRID)
        _hline(img, left - 4, left, y, _AXIS)
        _text(img, left - 8, y - _GLYPH_H * s // 2, f"{25 * k}%", _TEXT, s, "right")
    slot = (right - left) / len(bars)
    bar_w = max(1, min(int(slot * 0.6), 70))
    room = int(slot) - 4
    # One font scale and format for all value labels, one scale for all names: the largest
    # that fits every bar's slot (names that still do not fit are cut).
    for value_fmt, vs in (("{:.1f}%", s), ("{:.0f}%", s), ("{:.1f}%", 1), ("{:.0f}%", 1)):
        if all(_text_width(value_fmt.format(100 * v), vs) <= room for _, v in bars):
            break

    # Names: the first layout where all fit, of one row or two staggered rows (twice the
    # room) at the label scale, then the same at scale 1. Failing that, two rows at the label
    # scale if every name keeps 8 characters there, else two rows at scale 1; long names are cut.
    def name_room(rows: int) -> int:
        return int(rows * slot) - 6

    layouts = ((1, s), (2, s), (1, 1), (2, 1))
    name_rows, ns = next(
        (
            (rows, sc)
            for rows, sc in layouts
            if all(_text_width(name, sc) <= name_room(rows) for name, _ in bars)
        ),
        (2, s) if all(_text_width(n[:8], s) <= name_room(2) for n, _ in bars) else (2, 1),
    )
    for i, (name, v) in enumerate(bars):
        centre = int(round(left + slot * (i + 0.5)))
        x0 = centre - bar_w // 2
        height = int(round(v * (bottom - one)))
        _fill(img, x0, bottom - height, x0 + bar_w, bottom, PALETTE[i % len(PALETTE)])
        value = value_fmt.format(100 * v)
        _text(img, centre, bottom - height - _GLYPH_H * vs - 4, value, _TEXT, vs, "center")
        name_y = bottom + 8 + (i % name_rows) * (_LINE_H * ns + 2)
        _text(img, centre, name_y, _fit(name, name_room(name_rows), ns), _TEXT, ns, "center")
    _frame(img, left, top, right, bottom, _AXIS)


# --------------------------------------------------------------------------------------------
# PNG encoding and the public entry points.

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_CHUNK = 1 << 30


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def render_png(pixels: np.ndarray) -> bytes:
    """PNG file bytes (8-bit RGB, no interlace) of an ``(H, W, 3)`` uint8 array."""
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must have dtype uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must have shape (H, W, 3) with H, W >= 1, got {pixels.shape}")
    h, w = pixels.shape[:2]
    if h >= 1 << 31 or w >= 1 << 31:
        raise ValueError(f"image too large for PNG: {w}x{h}")
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # filter byte 0 (None) before each row
    raw[:, 1:] = pixels.reshape(h, 3 * w)
    data = zlib.compress(raw.tobytes(), 6)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    idat = b"".join(
        _chunk(b"IDAT", data[i : i + _MAX_CHUNK]) for i in range(0, len(data), _MAX_CHUNK)
    )
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + idat + _chunk(b"IEND", b"")


def write_demo_plot(
    path,
    *,
    curves,
    bars,
    title: str = "kdcore demo",
    curve_title: str = "training loss",
    bar_title: str = "task success rate",
    y_log: bool = False,
) -> None:
    """Writes a WIDTH x HEIGHT PNG: line chart of ``curves`` left, bar chart of ``bars`` right.

    ``curves`` maps a name to ``[(step, value), ...]`` (or an ``(n, 2)`` array); each curve
    gets its colour (``PALETTE`` in order) and a legend entry. Points are joined in the
    order given; NaN/inf points (and, with ``y_log``, values <= 0) are left out. ``bars``
    maps a name to a value in [0, 1], drawn as a percentage. An empty panel reads
    "no data". Raises ``ValueError`` for non-numeric points or bar values outside [0, 1],
    before touching ``path``; the file is replaced atomically (temp file + ``os.replace``).
    """
    clean_curves = _clean_curves(curves, bool(y_log))
    clean_bars = _clean_bars(bars)
    img = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    _text(img, WIDTH // 2, 10, _fit(str(title), WIDTH - 40, _S_TITLE), _TEXT, _S_TITLE, "center")
    panel_top = 10 + _LINE_H * _S_TITLE + 8
    _line_panel(img, (0, panel_top, _SPLIT, HEIGHT), clean_curves, str(curve_title), bool(y_log))
    _bar_panel(img, (_SPLIT, panel_top, WIDTH, HEIGHT), clean_bars, str(bar_title))
    data = render_png(img)
    atomic_write(path, lambda f: f.write(data))
