"""Built-in demo concepts: small synthetic photos drawn procedurally, so the demo needs no download.

`castle` (a stone castle with towers, seen from different places and times of day) and `canal`
(a canal between house fronts, in one-point perspective). Drawing is deterministic: the same
version gives the same PNG files on every machine.
"""

from __future__ import annotations

import random
from pathlib import Path

from .errors import warn

DEMO_CONCEPTS = ("castle", "canal")
DEMO_VERSION = 1
DEMO_SIZE = 256
DEMO_COUNT = 8
_SUPERSAMPLE = 2


def demo_concept_folder(concept: str) -> Path:
    """The folder of the demo set's PNGs, drawn on first use. Each cached PNG is checked when the folder
    is read; a damaged one is drawn again, with a warning."""

    from .data import damaged_image
    from .fileio import atomic_write, sweep_dead_temporaries
    from .models import cache_dir

    folder = cache_dir() / "concepts" / f"{concept}-v{DEMO_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(folder, lambda name: name.endswith(".png"))
    for index in range(DEMO_COUNT):
        path = folder / f"{concept}-{index:02d}.png"
        if path.exists():
            problem = damaged_image(path)
            if problem is None:
                continue
            warn(f"cached demo image {path} is damaged ({problem}): drawn again")
        with atomic_write(path) as tmp:
            draw_demo_image(concept, index).save(tmp, format="PNG")
    return folder


def draw_demo_image(concept: str, index: int):
    from PIL import Image

    rng = random.Random(f"{concept}-{index}")
    size = DEMO_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (size, size))
    {"castle": _draw_castle, "canal": _draw_canal}[concept](image, rng)
    return image.resize((DEMO_SIZE, DEMO_SIZE), Image.Resampling.LANCZOS)


def _mix(a, b, t):
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _jitter(color, rng, amount=18):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)


def _sky(draw, size, horizon, rng):
    top, bottom = rng.choice(
        [((70, 130, 210), (180, 215, 240)), ((40, 60, 120), (240, 160, 110)), ((110, 160, 220), (230, 235, 240))]
    )
    for y in range(horizon):
        draw.line([(0, y), (size, y)], fill=_mix(top, bottom, y / max(1, horizon)))
    for _ in range(rng.randint(1, 4)):  # clouds
        cx, cy, w = rng.uniform(0, size), rng.uniform(0.05, 0.35) * size, rng.uniform(0.1, 0.25) * size
        for k in range(5):
            dx, dy, r = rng.uniform(-w, w) / 2, rng.uniform(-w, w) / 8, w / rng.uniform(3, 5)
            draw.ellipse([cx + dx - r, cy + dy - r * 0.6, cx + dx + r, cy + dy + r * 0.6], fill=(245, 245, 248))


def _draw_castle(image, rng):
    from PIL import ImageDraw

    size = image.size[0]
    draw = ImageDraw.Draw(image)
    horizon = int(size * rng.uniform(0.55, 0.7))
    _sky(draw, size, horizon, rng)
    hills = _jitter((80, 130, 60), rng)
    draw.rectangle([0, horizon, size, size], fill=hills)
    draw.ellipse([-size * 0.3, horizon - size * 0.08, size * 0.6, horizon + size * 0.2], fill=_mix(hills, (0, 0, 0), 0.1))

    stone = _jitter((150, 145, 135), rng, 25)
    dark = _mix(stone, (0, 0, 0), 0.35)
    scale = rng.uniform(0.75, 1.05)
    cx = size * rng.uniform(0.4, 0.6)
    base = horizon + size * 0.05
    wall_w, wall_h = size * 0.5 * scale, size * 0.22 * scale
    left, right, top = cx - wall_w / 2, cx + wall_w / 2, base - wall_h
    merlon = wall_w / 14

    def crenellate(x0, x1, y, color):
        x = x0
        while x < x1 - merlon / 2:
            draw.rectangle([x, y - merlon * 0.8, x + merlon * 0.6, y], fill=color)
            x += merlon

    draw.rectangle([left, top, right, base], fill=stone)
    crenellate(left, right, top, stone)
    tower_w, tower_h = wall_w * 0.2, wall_h * rng.uniform(1.6, 2.0)
    roof = _jitter(rng.choice([(150, 50, 45), (60, 70, 120), (90, 90, 100)]), rng)
    for tx in (left - tower_w / 2, right - tower_w / 2) + ((cx - tower_w / 2,) if rng.random() < 0.5 else ()):
        height = tower_h * (1.25 if tx == cx - tower_w / 2 else 1.0)
        draw.rectangle([tx, base - height, tx + tower_w, base], fill=_mix(stone, (255, 255, 255), 0.05))
        if rng.random() < 0.6:
            draw.polygon([(tx - tower_w * 0.1, base - height), (tx + tower_w * 1.1, base - height),
                          (tx + tower_w / 2, base - height - tower_w * 1.2)], fill=roof)
        else:
            crenellate(tx, tx + tower_w, base - height, stone)
        for wy in (0.3, 0.55):
            wx = tx + tower_w * 0.4
            draw.rectangle([wx, base - height * (1 - wy), wx + tower_w * 0.2, base - height * (1 - wy) + tower_w * 0.35], fill=dark)
    gate_w = wall_w * 0.16
    draw.rectangle([cx - gate_w / 2, base - wall_h * 0.45, cx + gate_w / 2, base], fill=dark)
    draw.ellipse([cx - gate_w / 2, base - wall_h * 0.45 - gate_w / 2, cx + gate_w / 2, base - wall_h * 0.45 + gate_w / 2], fill=dark)
    flag_x = cx - tower_w / 2 + tower_w / 2
    draw.line([(flag_x, top - tower_h * 0.9), (flag_x, top - tower_h * 1.2)], fill=(60, 50, 40), width=max(2, size // 200))
    draw.polygon([(flag_x, top - tower_h * 1.2), (flag_x + size * 0.05, top - tower_h * 1.15), (flag_x, top - tower_h * 1.1)],
                 fill=_jitter((200, 30, 40), rng))
    draw.rectangle([0, base, size, size], fill=_mix(hills, (60, 50, 30), 0.3))


def _draw_canal(image, rng):
    from PIL import ImageDraw

    size = image.size[0]
    draw = ImageDraw.Draw(image)
    vx, vy = size * rng.uniform(0.4, 0.6), size * rng.uniform(0.38, 0.5)
    _sky(draw, size, int(vy) + 2, rng)
    water = _jitter(rng.choice([(40, 90, 100), (50, 80, 70), (60, 100, 130)]), rng)
    quay = _jitter((120, 110, 100), rng)
    draw.rectangle([0, vy, size, size], fill=quay)
    half = size * rng.uniform(0.3, 0.42)
    draw.polygon([(vx, vy), (vx - half * 1.6, size), (vx + half * 1.6, size)], fill=water)
    for k in range(12):  # reflections on the water
        t = rng.uniform(0.1, 1.0)
        y = vy + (size - vy) * t
        w = half * 1.6 * t * rng.uniform(0.2, 0.8)
        draw.line([(vx - w, y), (vx - w * 0.4, y)], fill=_mix(water, (255, 255, 255), 0.25), width=max(1, int(3 * t * _SUPERSAMPLE)))
    palette = [(170, 80, 60), (200, 160, 90), (120, 60, 50), (220, 200, 170), (90, 100, 110), (180, 120, 80)]
    for side in (-1, 1):
        edge = vx + side * half * 1.6
        depth = 1.0
        while depth > 0.08:  # house fronts receding to the vanishing point
            nxt = depth * rng.uniform(0.62, 0.78)
            x0, x1 = vx + (edge - vx) * depth, vx + (edge - vx) * nxt
            height = size * rng.uniform(0.45, 0.8)
            y_top0, y_top1 = vy - height * depth, vy - height * nxt
            y_bot0, y_bot1 = vy + (size - vy) * depth * 0.85, vy + (size - vy) * nxt * 0.85
            color = _jitter(rng.choice(palette), rng)
            draw.polygon([(x0, y_top0), (x1, y_top1), (x1, y_bot1), (x0, y_bot0)], fill=color)
            for row in range(3):
                for col in range(2):
                    fx, fy = 0.25 + col * 0.35, 0.15 + row * 0.22
                    wx = x0 + (x1 - x0) * fx
                    wt = y_top0 + (y_top1 - y_top0) * fx
                    wb = y_bot0 + (y_bot1 - y_bot0) * fx
                    wy = wt + (wb - wt) * fy
                    hw, hh = abs(x1 - x0) * 0.08, (wb - wt) * 0.08
                    draw.rectangle([wx - hw, wy - hh, wx + hw, wy + hh], fill=_mix(color, (20, 25, 35), 0.7))
            depth = nxt
    if rng.random() < 0.7:  # a boat
        t = rng.uniform(0.55, 0.85)
        by = vy + (size - vy) * t
        bx = vx + rng.uniform(-0.4, 0.4) * half * t
        bw, bh = half * 0.5 * t, half * 0.09 * t
        draw.polygon([(bx - bw, by), (bx + bw, by), (bx + bw * 0.8, by + bh), (bx - bw * 0.8, by + bh)],
                     fill=_jitter((30, 30, 35), rng))
