"""A procedural detector for the shapes world: colour segmentation, connected components, shape descriptors.

No learned weights, so it scores generated images the same way today and in a year. It finds saturated blobs (the
backgrounds are grey), names each by the nearest palette hue, and tells the shape from three descriptors:

- solidity, area / convex-hull area: a star's concave points give ~0.6, the convex shapes ~0.9-1;
- fill, area / bounding-box area: square ~1, circle ~0.79, triangle ~0.5;
- corners, the prominent peaks of the radial signature (distance from the centroid to the outline, by angle): a
  circle has none, a square four. Fill alone reads a square whose sides bow inward (fill ~0.8, what the shipped
  model draws) as a circle; its four corners still tell it apart. The signature's max/min ratio guards the corner
  count: a lumpy circle can have four small bumps, but not a ratio near a square's (1.3 straight, ~1.6 bowed).
  Likewise a triangle with concave sides is as non-convex as a star, and its three corners (a star has five) say
  which it is.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from accel.pipelines.shapes import COLOURS, Scene

_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}

# Thresholds, tuned on generator images (tests/test_shapes.py checks the accuracy they give).
MIN_SATURATION = 0.4
MIN_VALUE = 0.2
STAR_MAX_SOLIDITY = 0.8
SQUARE_MIN_FILL = 0.89
CIRCLE_MIN_FILL = 0.66
# Generator images: circles' signature ratio is at most 1.08, squares' at least 1.28; every square has 4 corners
# every triangle 3, every star 5 (but for 2 of ~190, which touch others) and every circle 0 at this prominence (a
# share of the mean radius).
CORNER_PROMINENCE = 0.08
SQUARE_MIN_SIGNATURE_RATIO = 1.2
SIGNATURE_BINS = 36
# Blobs smaller than this many pixels of a base-resolution image are noise. It is absolute, not relative to the
# image: at 2x or 4x a model tends to repeat objects at its training size, and those copies must count.
MIN_AREA_AT_BASE = 30


@dataclass(frozen=True)
class Detection:
    """One detected object. ``x``, ``y``: centroid as shares of width and height; ``area`` in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    area: int
    fill: float
    solidity: float
    corners: int
    signature_ratio: float


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an ``[H, W, 3]`` image (uint8, or float in [0, 1])."""
    rgb = np.asarray(image, dtype=np.float32)
    if rgb.max() > 1.5:
        rgb = rgb / 255.0
    height, width = rgb.shape[:2]
    value = rgb.max(axis=-1)
    saturation = np.where(value > 0, (value - rgb.min(axis=-1)) / np.maximum(value, 1e-6), 0.0)
    hue = _hue(rgb)
    colour_index = _nearest_palette_colour(hue)
    foreground = (saturation > MIN_SATURATION) & (value > MIN_VALUE)
    min_area = MIN_AREA_AT_BASE

    detections = []
    names = list(COLOURS)
    for index, name in enumerate(names):
        mask = foreground & (colour_index == index)
        if mask.sum() < min_area:
            continue
        labels = _connected_components(mask)
        for component in _components(labels):
            ys, xs = component
            if len(xs) < min_area:
                continue
            detections.append(_describe(name, xs, ys, width, height))
    return detections


def _hue(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maximum, minimum = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = np.maximum(maximum - minimum, 1e-6)
    hue = np.where(
        maximum == r, ((g - b) / delta) % 6, np.where(maximum == g, (b - r) / delta + 2, (r - g) / delta + 4)
    )
    return hue / 6.0


def _nearest_palette_colour(hue: np.ndarray) -> np.ndarray:
    palette = np.array(list(_PALETTE_HUES.values()), dtype=np.float32)
    distance = np.abs(hue[..., None] - palette)
    distance = np.minimum(distance, 1.0 - distance)  # hue is circular
    return distance.argmin(axis=-1)


def _connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of ``mask``: an int label per pixel, 0 for background."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels


def _components(labels: np.ndarray):
    """``(ys, xs)`` pixel coordinates of each labelled component, found in one pass over the labels."""
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    order = np.argsort(ids, kind="stable")
    ys, xs, ids = ys[order], xs[order], ids[order]
    boundaries = np.flatnonzero(np.diff(ids)) + 1
    return zip(np.split(ys, boundaries), np.split(xs, boundaries), strict=True)


def _describe(colour: str, xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> Detection:
    area = len(xs)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = area / box
    solidity = area / _hull_area(xs, ys)
    signature = _radial_signature(xs, ys)
    corners = _prominent_peaks(signature, CORNER_PROMINENCE)
    signature_ratio = float(signature.max() / signature.min())
    if solidity < STAR_MAX_SOLIDITY:
        # A triangle whose sides bow inward is as concave as a small star, but has three points, not five.
        shape = "triangle" if corners == 3 else "star"
    elif fill >= SQUARE_MIN_FILL or (
        fill >= CIRCLE_MIN_FILL and corners == 4 and signature_ratio >= SQUARE_MIN_SIGNATURE_RATIO
    ):
        shape = "square"
    elif fill >= CIRCLE_MIN_FILL:
        shape = "circle"
    else:
        shape = "triangle"
    return Detection(
        colour=colour,
        shape=shape,
        x=float((xs.mean() + 0.5) / width),
        y=float((ys.mean() + 0.5) / height),
        area=int(area),
        fill=float(fill),
        solidity=float(min(solidity, 1.0)),
        corners=corners,
        signature_ratio=signature_ratio,
    )


def _radial_signature(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Outline distance from the centroid in ``SIGNATURE_BINS`` angular bins, lightly smoothed, over its mean."""
    from scipy import ndimage

    left, top = xs.min(), ys.min()
    mask = np.zeros((ys.max() - top + 3, xs.max() - left + 3), dtype=bool)
    mask[ys - top + 1, xs - left + 1] = True
    mask = ndimage.binary_fill_holes(mask)
    outline_y, outline_x = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    inside_y, inside_x = np.nonzero(mask)
    dx, dy = outline_x - inside_x.mean(), outline_y - inside_y.mean()
    # +0.5: to the outer edge of the outline pixel, so a 3-pixel blob is not read as a point.
    radius = np.hypot(dx, dy) + 0.5
    bins = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * SIGNATURE_BINS).astype(np.int64) % SIGNATURE_BINS
    signature = np.zeros(SIGNATURE_BINS)
    np.maximum.at(signature, bins, radius)
    seen = np.flatnonzero(signature > 0)
    # Small blobs leave angular bins empty: fill them by circular interpolation between their neighbours.
    signature = np.interp(
        np.arange(SIGNATURE_BINS),
        np.concatenate([seen - SIGNATURE_BINS, seen, seen + SIGNATURE_BINS]),
        np.tile(signature[seen], 3),
    )
    signature = (np.roll(signature, 1) + 2 * signature + np.roll(signature, -1)) / 4
    return signature / signature.mean()


def _prominent_peaks(signature: np.ndarray, prominence: float) -> int:
    """Circular local maxima that stand ``prominence`` above the lower of the lowest points on each side before a
    higher value."""
    n = len(signature)
    count = 0
    for i in range(n):
        peak = signature[i]
        if not (peak > signature[i - 1] and peak >= signature[(i + 1) % n]):
            continue
        base = -np.inf
        for step in (1, -1):
            lowest, j = peak, i
            for _ in range(n - 1):
                j = (j + step) % n
                if signature[j] > peak:
                    break
                lowest = min(lowest, signature[j])
            base = max(base, lowest)
        count += peak - base >= prominence
    return count


def _hull_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Convex-hull area of the pixels' corners (Andrew's monotone chain + shoelace)."""
    # Only each row's leftmost and rightmost pixels can lie on the hull: a few points per row instead of all pixels.
    order = np.lexsort((xs, ys))
    xs, ys = xs[order], ys[order]
    rows, first = np.unique(ys, return_index=True)
    last = np.append(first[1:], len(xs)) - 1
    edge_x, edge_y = np.concatenate([xs[first], xs[last]]), np.concatenate([rows, rows])
    corners = np.concatenate(
        [np.stack([edge_x + dx, edge_y + dy], axis=1) for dx in (0, 1) for dy in (0, 1)], axis=0
    ).astype(np.int64)
    points = np.unique(corners, axis=0)  # sorted by x, then y
    if len(points) < 3:
        return float(len(xs))

    def half(sequence):
        chain: list[np.ndarray] = []
        for point in sequence:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
        return chain[:-1]

    hull = np.array(half(points) + half(points[::-1]), dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2) or float(len(xs))


def _cross(o, a, b) -> int:
    return int((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


@dataclass(frozen=True)
class SceneScore:
    """How a generated image answers its prompt.

    Attributes:
        adherent: every requested object is found with the right colour and shape (at least as many as asked).
        colour_adherent: every requested colour is found at least as many times as asked, whatever the shape.
        duplicates: copies of requested (colour, shape) objects beyond the number asked.
        colour_duplicates: objects of a requested colour beyond the number asked, whatever their shape (robust to
            shape mistakes, so it still measures duplication when a model's shapes are unreliable).
        detections: everything found.
    """

    adherent: bool
    colour_adherent: bool
    duplicates: int
    colour_duplicates: int
    detections: tuple[Detection, ...]


def score(image: np.ndarray, scene: Scene) -> SceneScore:
    detections = tuple(detect(image))
    found: dict[tuple[str, str], int] = {}
    found_colours: dict[str, int] = {}
    for d in detections:
        found[(d.colour, d.shape)] = found.get((d.colour, d.shape), 0) + 1
        found_colours[d.colour] = found_colours.get(d.colour, 0) + 1
    requested = scene.requested()
    requested_colours: dict[str, int] = {}
    for (colour, _), count in requested.items():
        requested_colours[colour] = requested_colours.get(colour, 0) + count
    return SceneScore(
        adherent=all(found.get(key, 0) >= count for key, count in requested.items()),
        colour_adherent=all(found_colours.get(c, 0) >= n for c, n in requested_colours.items()),
        duplicates=sum(max(0, found.get(key, 0) - count) for key, count in requested.items()),
        colour_duplicates=sum(max(0, found_colours.get(c, 0) - n) for c, n in requested_colours.items()),
        detections=detections,
    )


def matches_exactly(detections, scene: Scene) -> bool:
    """True when the detections are exactly the scene's objects (colour and shape, with multiplicity)."""
    found: dict[tuple[str, str], int] = {}
    for d in detections:
        found[(d.colour, d.shape)] = found.get((d.colour, d.shape), 0) + 1
    return found == scene.requested()
