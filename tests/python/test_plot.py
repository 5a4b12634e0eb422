"""The dependency-free PNG chart writer: decoded here with zlib/struct, checked pixel by pixel."""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import pytest

import kdcore._plot as plot
from kdcore._plot import HEIGHT, PALETTE, WIDTH, render_png, write_demo_plot

NAN, INF = float("nan"), float("inf")
SWATCH = 20 * 3  # pixels of a curve's colour in its legend entry


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 of an 8-bit RGB PNG as render_png writes it; checks every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert len(body) == length, kind
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and chunks[-1][1] == b""
    assert set(kinds[1:-1]) == {b"IDAT"}
    assert len(chunks[0][1]) == 13
    width, height, depth, color_type, compression, filt, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, color_type, compression, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all(), "render_png writes filter type 0 (None) on every row"
    return rows[:, 1:].reshape(height, width, 3)


def draw(tmp_path, name="plot.png", **kwargs) -> np.ndarray:
    kwargs.setdefault("curves", {})
    kwargs.setdefault("bars", {})
    path = tmp_path / name
    write_demo_plot(path, **kwargs)
    img = decode_png(path.read_bytes())
    assert img.shape == (HEIGHT, WIDTH, 3)
    assert sorted(os.listdir(tmp_path)) == [name], "temp file left behind"
    return img


def color_mask(img: np.ndarray, color) -> np.ndarray:
    return np.all(img == np.array(color, dtype=np.uint8), axis=2)


def bar_height(img: np.ndarray, color) -> int:
    """Height in pixels of the bar of this colour: its tallest column, checked to be one run."""
    mask = color_mask(img, color)
    mask[:, : WIDTH // 2] = False  # bars live in the right panel
    columns = mask.sum(axis=0)
    col = int(columns.argmax())
    ys = np.flatnonzero(mask[:, col])
    assert len(ys) == 0 or ys[-1] - ys[0] + 1 == len(ys), "bar column is not contiguous"
    return int(columns.max())


# --- render_png ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (64, 3, 3)])
def test_render_png_round_trip(shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(decode_png(render_png(pixels)), pixels)


def test_render_png_non_contiguous_input():
    pixels = np.random.default_rng(1).integers(0, 256, size=(9, 20, 3), dtype=np.uint8)
    view = pixels[::2, ::3]
    assert np.array_equal(decode_png(render_png(view)), view)


@pytest.mark.parametrize(
    "pixels",
    [
        [[[0, 0, 0]]],
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4), dtype=np.uint8),
        np.zeros((4, 4, 4), dtype=np.uint8),
        np.zeros((0, 4, 3), dtype=np.uint8),
    ],
)
def test_render_png_rejects_bad_arrays(pixels):
    with pytest.raises(ValueError, match="pixels"):
        render_png(pixels)


# --- write_demo_plot -------------------------------------------------------------------------


def test_demo_plot_draws_every_curve(tmp_path):
    steps = range(0, 1001, 10)
    curves = {
        "kd loss": [(s, 2.0 * math.exp(-s / 300) + 0.2) for s in steps],
        "ce loss": [(s, 3.0 * math.exp(-s / 500) + 0.4) for s in steps],
        "teacher": [(s, 0.3) for s in steps],
    }
    img = draw(tmp_path, curves=curves, bars={"copy": 0.9, "sort": 0.4})
    assert (img[0, 0] == 255).all() and (img[-1, -1] == 255).all()
    assert color_mask(img, (255, 255, 255)).mean() > 0.7  # mostly white background
    left = img[:, : WIDTH // 2 + 50]
    for i in range(len(curves)):
        assert color_mask(left, PALETTE[i]).sum() > 500 + SWATCH, f"curve {i} not drawn"
    assert not color_mask(left, PALETTE[len(curves)]).any()
    assert bar_height(img, PALETTE[0]) > bar_height(img, PALETTE[1]) > 0


def test_bar_heights_are_proportional(tmp_path):
    img = draw(tmp_path, bars={"low": 0.2, "high": 0.8})
    low, high = bar_height(img, PALETTE[0]), bar_height(img, PALETTE[1])
    assert high > 150
    assert high / low == pytest.approx(4.0, abs=0.1)
    # Both bars stand on the same baseline.
    bottoms = [np.flatnonzero(color_mask(img, PALETTE[i]).any(axis=1))[-1] for i in (0, 1)]
    assert bottoms[0] == bottoms[1]


def test_bar_zero_and_full(tmp_path):
    img = draw(tmp_path, bars={"none": 0.0, "all": 1.0, "half": 0.5})
    assert bar_height(img, PALETTE[0]) == 0
    assert bar_height(img, PALETTE[1]) / bar_height(img, PALETTE[2]) == pytest.approx(2, abs=0.05)


def test_empty_panels_draw_no_series(tmp_path):
    img = draw(tmp_path, curves={}, bars={})
    for color in PALETTE:
        assert not color_mask(img, color).any()
    # "no data" is written in each panel.
    muted = color_mask(img, plot._MUTED)
    assert muted[:, : plot._SPLIT].sum() > 50 and muted[:, plot._SPLIT :].sum() > 50


def test_single_point_draws_a_marker(tmp_path):
    img = draw(tmp_path, curves={"one": [(100, 0.5)]})
    mask = color_mask(img[:, : plot._SPLIT], PALETTE[0])
    # A solid 5x5 square (the legend swatch is only 3 px tall) and no line beyond it.
    windows = np.lib.stride_tricks.sliding_window_view(mask, (5, 5))
    assert windows.all(axis=(2, 3)).sum() == 1
    assert mask.sum() <= 25 + SWATCH


def test_non_finite_points_are_skipped(tmp_path):
    with_nan = [(0, 1.0), (1, NAN), (2, 3.0), (3, INF), (NAN, 5.0), (-INF, 2.0), (4, 2.0)]
    clean = [(0, 1.0), (2, 3.0), (4, 2.0)]
    a = draw(tmp_path, "a.png", curves={"c": with_nan})
    os.remove(tmp_path / "a.png")
    b = draw(tmp_path, "b.png", curves={"c": clean})
    assert np.array_equal(a, b)
    assert color_mask(a, PALETTE[0]).sum() > 200 + SWATCH


def test_numpy_inputs_match_python_inputs(tmp_path):
    points = [(float(s), 1.0 / (s + 1)) for s in range(50)]
    a = draw(tmp_path, "a.png", curves={"c": points}, bars={"b": 0.25})
    os.remove(tmp_path / "a.png")
    b = draw(
        tmp_path,
        "b.png",
        curves={"c": np.array(points)},
        bars={"b": np.float32(0.25)},
    )
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"curves": {"a": []}}, id="empty-curve"),
        pytest.param({"curves": {"a": [(0, NAN), (INF, 1.0)]}}, id="all-nan"),
        pytest.param({"curves": {"a": [(s, 2.0) for s in range(10)]}}, id="equal-values"),
        pytest.param({"curves": {"a": [(3, 1.0), (3, 2.0)]}}, id="equal-steps"),
        pytest.param({"curves": {"a": [(0, 0.0), (1, 0.0)]}}, id="all-zero"),
        pytest.param({"curves": {"a": [(5, 7)]}, "y_log": True}, id="log-single"),
        pytest.param(
            {"curves": {"a": [(0, 0.0), (1, -1.0), (2, 1e-3), (3, 10.0)]}, "y_log": True},
            id="log-nonpositive",
        ),
        pytest.param({"curves": {"a": [(0, 0.0), (1, -1.0)]}, "y_log": True}, id="log-none-left"),
        pytest.param({"curves": {"a": [(0, 1e-300), (1, 2e-300)]}}, id="tiny"),
        pytest.param({"curves": {"a": [(0, 5e-324), (1, 1e-323)]}}, id="subnormal"),
        pytest.param({"curves": {"a": [(0, 1e30), (1e12, -1e30)]}}, id="huge"),
        pytest.param({"curves": {"a": [(0, 1e-12), (1, 1e40)]}, "y_log": True}, id="log-wide"),
        pytest.param({"curves": {"a": [(-5, -3.0), (-1, -0.5)]}}, id="negative"),
        pytest.param(
            {
                "curves": {f"curve {i} " * 8: [(s, i + s) for s in range(3)] for i in range(15)},
                "bars": {f"task number {i}": i / 30 for i in range(30)},
            },
            id="many-series-long-names",
        ),
        pytest.param(
            {
                "curves": {"\u03b1 \u2192 \u03b2\t\n": [(0, 1), (1, 2)]},
                "bars": {"\u00e9t\u00e9": 0.5},
                "title": "\u2603" * 100,
                "curve_title": "",
                "bar_title": "x" * 500,
            },
            id="unicode-and-long-titles",
        ),
        pytest.param({"bars": {"only": 1.0}}, id="one-bar"),
        pytest.param({"curves": {1: [(0, 1), (1, 2)]}, "bars": {2: 0.5}}, id="non-str-names"),
        pytest.param({"curves": {"a": [(np.int64(1), np.float32(2.5))]}}, id="numpy-scalars"),
    ],
)
def test_edge_cases_write_valid_png(tmp_path, kwargs):
    draw(tmp_path, **kwargs)


def test_curve_colour_present_for_edge_values(tmp_path):
    img = draw(tmp_path, curves={"flat": [(s, 2.0) for s in range(10)], "x": [(3, 1), (3, 2)]})
    assert color_mask(img, PALETTE[0]).sum() > 500 + SWATCH  # horizontal line across the plot
    assert color_mask(img, PALETTE[1]).sum() > 300 + SWATCH  # vertical line


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bars": {"a": 1.5}}, r"bar 'a'.*\[0, 1\]"),
        ({"bars": {"a": -0.01}}, r"\[0, 1\]"),
        ({"bars": {"a": NAN}}, r"\[0, 1\]"),
        ({"bars": {"a": INF}}, r"\[0, 1\]"),
        ({"bars": {"a": "0.5"}}, "must be a number"),
        ({"bars": {"a": None}}, "must be a number"),
        ({"bars": {"a": True}}, "must be a number"),
        ({"bars": [0.5]}, "bars must be a dict"),
        ({"curves": {"a": [(0, "x")]}}, r"curve 'a' point 0 value must be a number"),
        ({"curves": {"a": [(None, 1.0)]}}, r"curve 'a' point 0 step must be a number"),
        ({"curves": {"a": [(0, 1), (1,)]}}, r"point 1: expected \(step, value\)"),
        ({"curves": {"a": [(1, 2, 3)]}}, r"expected \(step, value\)"),
        ({"curves": {"a": [1, 2]}}, r"expected \(step, value\)"),
        ({"curves": {"a": ["ab"]}}, r"expected \(step, value\)"),
        ({"curves": {"a": [(0, complex(1, 1))]}}, "must be a number"),
        ({"curves": {"a": 5}}, "list of .step, value. pairs"),
        ({"curves": {"a": "abc"}}, "list of .step, value. pairs"),
        ({"curves": {"a": np.zeros((3, 3))}}, r"shape \(n, 2\)"),
        ({"curves": [(0, 1.0)]}, "curves must be a dict"),
        ({"curves": {"a": [(0, -1e308), (1, 1e308)]}}, "too wide"),
    ],
)
def test_bad_input_raises_value_error(tmp_path, kwargs, match):
    kwargs.setdefault("curves", {})
    kwargs.setdefault("bars", {})
    with pytest.raises(ValueError, match=match):
        write_demo_plot(tmp_path / "bad.png", **kwargs)
    assert os.listdir(tmp_path) == []


def test_overwrite_is_atomic_and_failures_keep_old_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    write_demo_plot(str(path), curves={"a": [(0, 1), (1, 2)]}, bars={"b": 0.5})
    first = path.read_bytes()
    decode_png(first)
    with pytest.raises(ValueError):
        write_demo_plot(path, curves={}, bars={"b": 2.0})
    assert path.read_bytes() == first
    assert os.listdir(tmp_path) == ["plot.png"]


def test_missing_directory_raises_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_demo_plot(tmp_path / "missing" / "plot.png", curves={}, bars={})
    assert os.listdir(tmp_path) == []


# --- font and ticks --------------------------------------------------------------------------


def test_font_covers_printable_ascii_with_distinct_glyphs():
    seen = {}
    for code in range(32, 127):
        ch = chr(code)
        glyph = plot._FONT[ch]
        assert glyph.shape in ((7, 5), (9, 5)), ch
        assert glyph.any() == (ch != " "), ch
        key = glyph.tobytes() + bytes(glyph.shape)
        assert key not in seen, f"{ch!r} looks like {seen.get(key)!r}"
        seen[key] = ch
    assert len(plot._FONT) == 95


def test_unknown_character_draws_a_box():
    img = np.full((20, 20, 3), 255, dtype=np.uint8)
    plot._text(img, 2, 3, "\u2192", (0, 0, 0))
    ink = color_mask(img, (0, 0, 0))
    assert np.array_equal(ink[3:10, 2:7], plot._BOX)
    assert ink.sum() == plot._BOX.sum()


@pytest.mark.parametrize(
    ("lo", "hi", "labels"),
    [
        (0.3, 3.5, ["0", "1", "2", "3", "4"]),
        (0, 2000, ["0", "500", "1000", "1500", "2000"]),
        (0.013, 0.048, ["0.01", "0.02", "0.03", "0.04", "0.05"]),
        (0.0123, 0.0181, ["0.012", "0.014", "0.016", "0.018", "0.020"]),
        (-1.0, 1.0, ["-1.0", "-0.5", "0.0", "0.5", "1.0"]),
        (0, 3e7, ["0", "1e7", "2e7", "3e7"]),
        (1e-5, 5e-5, ["1e-5", "2e-5", "3e-5", "4e-5", "5e-5"]),
    ],
)
def test_linear_ticks_are_round_numbers(lo, hi, labels):
    axis_lo, axis_hi, values, got = plot._linear_ticks(lo, hi)
    assert got == labels
    assert axis_lo <= lo and axis_hi >= hi
    assert axis_lo == values[0] and axis_hi == values[-1]


@pytest.mark.parametrize("value", [0.0, 2.0, -7.5, 1e-300, 1e300])
def test_equal_values_get_a_nonempty_axis(value):
    lo, hi, values, labels = plot._linear_ticks(value, value)
    assert lo < hi and len(values) >= 2 and len(labels) == len(values)
    assert lo <= value <= hi


def test_log_ticks_are_decades():
    lo, hi, values, labels = plot._log_ticks(math.log10(0.004), math.log10(3.0))
    assert labels == ["0.001", "0.01", "0.1", "1", "10"]
    assert (lo, hi) == (-3.0, 1.0) and values == [-3.0, -2.0, -1.0, 0.0, 1.0]
