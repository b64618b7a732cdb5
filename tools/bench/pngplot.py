"""A log-log line plot written as a PNG with zlib + struct (no plotting dependency).

Enough for the benchmark's one figure: axes with decade/power-of-two ticks, labelled series with
markers, a legend and a title, drawn with a built-in 5x7 font (text is drawn in capitals).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

Color = tuple[int, int, int]

_FONT_ROWS = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "'": "..#..|..#..|.#...|.....|.....|.....|.....",
    " ": ".....|.....|.....|.....|.....|.....|.....",
}
FONT = {ch: [row for row in rows.split("|")] for ch, rows in _FONT_ROWS.items()}

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (220, 220, 220)
PALETTE: list[Color] = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (140, 86, 75), (148, 103, 189),
                        (255, 127, 14)]


class Canvas:
    def __init__(self, width: int, height: int):
        self.w = width
        self.h = height
        self.px = bytearray(WHITE * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for y in range(max(0, y0), min(self.h, y1 + 1)):
            for x in range(max(0, x0), min(self.w, x1 + 1)):
                self.set(x, y, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1,
             dash: int = 0) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        half = width // 2
        for i in range(steps + 1):
            if dash and (i // dash) % 2:
                continue
            t = i / steps
            x = round(x0 + (x1 - x0) * t)
            y = round(y0 + (y1 - y0) * t)
            for dy in range(-half, width - half):
                for dx in range(-half, width - half):
                    self.set(x + dx, y + dy, color)

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw ``s`` with its top-left corner at (x, y); returns the width drawn."""
        cx = x
        for ch in s.upper():
            glyph = FONT.get(ch, FONT[" "])
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        self.rect(cx + col * scale, y + row * scale, cx + col * scale + scale - 1,
                                  y + row * scale + scale - 1, color)
            cx += 6 * scale
        return cx - x

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return len(s) * 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\0" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def human_count(n: float) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{int(n // size)}{unit}"
    return f"{n:g}"


def loglog_plot(path: Path, title: str, xlabel: str, ylabel: str,
                series: list[tuple[str, list[tuple[float, float]], bool]],
                width: int = 960, height: int = 680) -> None:
    """``series``: (label, [(x, y), ...], dashed). Both axes logarithmic."""
    cv = Canvas(width, height)
    left, right, top, bottom = 110, width - 30, 60, height - 190
    xs = [x for _, pts, _ in series for x, _ in pts]
    ys = [y for _, pts, _ in series for _, y in pts if y > 0]
    lx0, lx1 = math.log2(min(xs)), math.log2(max(xs))
    if lx1 - lx0 < 1:
        lx0, lx1 = lx0 - 0.5, lx1 + 0.5
    pad = (lx1 - lx0) * 0.05
    lx0, lx1 = lx0 - pad, lx1 + pad
    ly0 = math.floor(math.log10(min(ys)))
    ly1 = math.ceil(math.log10(max(ys)))
    if ly1 == ly0:
        ly1 += 1

    def px(x: float) -> float:
        return left + (math.log2(x) - lx0) / (lx1 - lx0) * (right - left)

    def py(y: float) -> float:
        return bottom - (math.log10(y) - ly0) / (ly1 - ly0) * (bottom - top)

    # grid and ticks
    for d in range(ly0, ly1 + 1):
        y = py(10.0 ** d)
        cv.line(left, y, right, y, GREY)
        label = f"{10.0 ** d:g}"
        cv.text(left - 10 - cv.text_width(label), round(y) - 7, label)
        for m in range(2, 10):
            if d < ly1:
                ym = py(m * 10.0 ** d)
                cv.line(left - 4, ym, left, ym, BLACK)
                if ly1 - ly0 <= 2 and m in (2, 5):
                    # Few decades: label 2x and 5x too, with a lighter grid line.
                    cv.line(left, ym, right, ym, (238, 238, 238))
                    label = f"{m * 10.0 ** d:g}"
                    cv.text(left - 10 - cv.text_width(label), round(ym) - 7, label)
    ticks = sorted({x for x in xs})
    for x in ticks:
        xp = px(x)
        cv.line(xp, top, xp, bottom, GREY)
        label = human_count(x)
        cv.text(round(xp) - cv.text_width(label) // 2, bottom + 10, label)
    cv.line(left, top, left, bottom, BLACK, 2)
    cv.line(left, bottom, right, bottom, BLACK, 2)
    cv.text(left + (right - left) // 2 - cv.text_width(xlabel) // 2, bottom + 34, xlabel)
    # y label, written horizontally above the axis
    cv.text(10, top - 30, ylabel)
    cv.text(width // 2 - cv.text_width(title) // 2, 12, title)
    # series
    for i, (_label, pts, dashed) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(p for p in pts if p[1] > 0)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            cv.line(px(x0), py(y0), px(x1), py(y1), color, 3, dash=8 if dashed else 0)
        for x, y in pts:
            cv.rect(round(px(x)) - 4, round(py(y)) - 4, round(px(x)) + 4, round(py(y)) + 4, color)
    # legend below the plot
    ly = bottom + 64
    for i, (label, _pts, dashed) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        y = ly + i * 20
        cv.line(left, y + 7, left + 40, y + 7, color, 3, dash=8 if dashed else 0)
        cv.text(left + 52, y, label)
    path.write_bytes(cv.png())
