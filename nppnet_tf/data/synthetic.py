"""Synthetic LIP: person-like figures written in LIP's exact release layout.

The real LIP is not on our machines, so the tests and the demo read this
instead, through the same code that will later read the real release
(`nppnet_tf/data/lip_files.py` describes the layout). Each image shows one
figure posed from a random skeleton; its parsing label map (the 20 LIP
classes, reference NPPNET.md 8.5) and its 16 joints (LIP order, reference
8.4) are drawn from the same geometry. docs/synthetic.md says what is drawn.

Reads nothing. Writes under `out_dir` the train/val JPEGs, id lists, parsing
PNGs and pose CSVs, optionally unlabelled test JPEGs, and
`synthetic_lip.json` (parameters and counts). Run it with
`nppnet data synth --out DIR --train N --val M --seed S`, or from Python
with `write_synthetic_lip(DIR, N, M, S)`.

Left and right are the PERSON's, as in LIP: a figure facing the camera has
its right arm (class 15, joints `right_*`) on the image's left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from nppnet_tf.data.lip_files import LIPLayout, write_pose_csv
from nppnet_tf.lip import CLASS_NAMES, LIP_JOINT_NAMES, NUM_JOINTS

log = logging.getLogger(__name__)

MARKER_FILE = "synthetic_lip.json"
JPEG_QUALITY = 90

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_RELEASE_FOLDERS = (
    "TrainVal_images",
    "TrainVal_parsing_annotations",
    "TrainVal_pose_annotations",
    "Testing_images",
)
_CLASS = {name: index for index, name in enumerate(CLASS_NAMES)}

# Chance that a joint inside the image is left unannotated. With the joints
# the frame cuts off, this comes near the real val file: about 10% of the
# slots missing, ankles about a third, knees a fifth.
_UNANNOTATED = {"ankle": 0.2, "knee": 0.12, "hip": 0.045, "wrist": 0.01}
_OTHER_UNANNOTATED = 0.01
_OCCLUDED = 0.08  # share of present joints with visibility flag 1

_SKIN_TONES = (
    (255, 224, 196),
    (241, 194, 160),
    (224, 172, 138),
    (198, 134, 100),
    (161, 102, 70),
    (120, 75, 50),
    (88, 56, 38),
)
_HAIR_COLOURS = (
    (20, 16, 14),
    (58, 38, 26),
    (105, 70, 42),
    (190, 150, 90),
    (150, 62, 30),
    (160, 160, 160),
)


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    """One rendered figure.

    Attributes:
        image: `(height, width, 3)` uint8 RGB.
        label: `(height, width)` uint8 LIP class ids, 0..19.
        joints: `(16, 3)` float x, y, flag in LIP order; NaN when missing.
    """

    image: np.ndarray
    label: np.ndarray
    joints: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Outfit:
    front: bool  # facing the camera, else seen from the back
    skin: tuple
    hair: tuple
    long_hair: float  # 0, or how far (units) the hair hangs below the chin
    top: str  # upper_clothes, dress, coat or jumpsuits
    top_colour: tuple
    sleeve: float  # share of the arm covered: 0 sleeveless .. 0.87
    inner_colour: tuple | None  # an open coat shows upper clothes
    bottom: str  # "pants", "skirt" or "none" (dress)
    bottom_colour: tuple
    trouser_length: float  # share of the leg covered, 1 = to the ankle
    skirt_length: float  # units below the pelvis
    socks: tuple | None
    shoes: tuple | None  # None: barefoot
    gloves: tuple | None
    scarf: tuple | None
    hat: tuple | None
    sunglasses: bool


@dataclasses.dataclass(frozen=True)
class _Figure:
    """A posed skeleton in image pixels. `unit` is the standing height in
    pixels; offsets below are in units along the body's `up`/`across`."""

    points: dict  # LIP joint names plus "head_centre", "<side>_hand"
    unit: float
    up: np.ndarray  # spine direction (y grows downwards)
    across: np.ndarray  # towards the image's right, perpendicular to up
    head_up: np.ndarray
    shoulder_half: float
    hip_half: float

    def at(self, up: float, across: float) -> np.ndarray:
        """The point `up` units along the spine from the pelvis and
        `across` units towards the image's right."""
        offset = self.up * up + self.across * across
        return self.points["pelvis"] + offset * self.unit

    def head_at(self, up: float, across: float) -> np.ndarray:
        head_across = np.array([-self.head_up[1], self.head_up[0]])
        offset = self.head_up * up + head_across * across
        return self.points["head_centre"] + offset * self.unit


class _Canvas:
    """Draws every shape three times: its colour on the image, its class on
    the label map and a part number on a part map (for the outlines)."""

    def __init__(self, image: Image.Image, label: Image.Image, unit: float):
        self.unit = unit
        self.parts_image = Image.new("L", image.size, 0)
        self.image = ImageDraw.Draw(image)
        self.label = ImageDraw.Draw(label)
        self.parts = ImageDraw.Draw(self.parts_image)
        self.part = 0

    def polygon(self, points, class_name, colour, same_part=False) -> None:
        if not same_part:
            self.part = self.part % 255 + 1
        xy = [(float(x), float(y)) for x, y in points]
        self.image.polygon(xy, fill=tuple(int(c) for c in colour))
        self.label.polygon(xy, fill=_CLASS[class_name])
        self.parts.polygon(xy, fill=self.part)

    def ellipse(self, centre, radii, class_name, colour, up=(0, -1)) -> None:
        """An ellipse with `radii` (across, up) in units, turned to `up`."""
        up = np.asarray(up, float)
        across = np.array([-up[1], up[0]])
        angles = np.linspace(0.0, 2.0 * math.pi, 28, endpoint=False)
        points = (
            centre
            + np.outer(np.cos(angles) * radii[0] * self.unit, across)
            + np.outer(np.sin(angles) * radii[1] * self.unit, up)
        )
        self.polygon(points, class_name, colour)

    def limb(self, start, end, radii, class_name, colour) -> None:
        """A tapered segment with round ends; `radii` at (start, end)."""
        start, end = np.asarray(start, float), np.asarray(end, float)
        along = end - start
        normal = np.array([-along[1], along[0]]) / max(np.hypot(*along), 1e-6)
        start_offset = normal * radii[0] * self.unit
        end_offset = normal * radii[1] * self.unit
        quad = (
            start + start_offset,
            end + end_offset,
            end - end_offset,
            start - start_offset,
        )
        self.polygon(quad, class_name, colour)
        for centre, radius in zip((start, end), radii):
            angles = np.linspace(0.0, 2.0 * math.pi, 20, endpoint=False)
            circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
            disc = centre + circle * radius * self.unit
            self.polygon(disc, class_name, colour, same_part=True)


def _jitter(rng: np.random.Generator, colour, amount: float = 18.0) -> tuple:
    values = np.asarray(colour, float) + rng.normal(0.0, amount, 3)
    return tuple(int(v) for v in np.clip(values, 0, 255))


def _random_colour(rng: np.random.Generator) -> tuple:
    hue, saturation = rng.random(), rng.uniform(0.15, 0.9)
    value = rng.uniform(0.2, 0.95)
    ramp = np.abs((hue * 6.0 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1
    rgb = value * (1.0 - saturation + saturation * np.clip(ramp, 0, 1))
    return tuple(int(v) for v in rgb * 255)


def _maybe_colour(rng: np.random.Generator, chance: float) -> tuple | None:
    return _random_colour(rng) if rng.random() < chance else None


def _sample_outfit(rng: np.random.Generator) -> _Outfit:
    front = bool(rng.random() < 0.78)  # the real val file: about 78%
    top = str(
        rng.choice(
            ["upper_clothes", "coat", "dress", "jumpsuits"],
            p=[0.55, 0.2, 0.15, 0.1],
        )
    )
    sleeves = [0.0, rng.uniform(0.2, 0.4), rng.uniform(0.75, 0.87)]
    sleeve = sleeves[2] if top == "coat" else float(rng.choice(sleeves))
    bottom, trouser_length = "none", 1.0
    if top == "jumpsuits":
        if rng.random() < 0.3:
            trouser_length = rng.uniform(0.25, 0.45)
    elif top != "dress":
        bottom = "pants" if rng.random() < 0.72 else "skirt"
        if bottom == "pants" and rng.random() < 0.3:
            trouser_length = rng.uniform(0.25, 0.75)  # shorts or capris
    bare_legs = top == "dress" or bottom == "skirt" or trouser_length < 1.0
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]
    return _Outfit(
        front=front,
        skin=_jitter(rng, skin, 8.0),
        hair=_jitter(rng, hair, 10.0),
        long_hair=rng.uniform(0.1, 0.3) if rng.random() < 0.35 else 0.0,
        top=top,
        top_colour=_random_colour(rng),
        sleeve=sleeve,
        inner_colour=_maybe_colour(rng, 0.6) if top == "coat" else None,
        bottom=bottom,
        bottom_colour=_random_colour(rng),
        trouser_length=trouser_length,
        skirt_length=rng.uniform(0.1, 0.25),
        socks=_maybe_colour(rng, 0.35) if bare_legs else None,
        shoes=_maybe_colour(rng, 0.92),
        gloves=_maybe_colour(rng, 0.1),
        scarf=_maybe_colour(rng, 0.12),
        hat=_maybe_colour(rng, 0.15),
        sunglasses=front and bool(rng.random() < 0.12),
    )


def _direction(down, outward, angle: float) -> np.ndarray:
    """Unit vector `angle` radians from `down` towards `outward`."""
    return down * math.cos(angle) + outward * math.sin(angle)


def _place(rng: np.random.Generator, width: int, height: int):
    """Figure unit (standing height, pixels) and pelvis position."""
    mode = rng.random()
    if mode < 0.78:  # whole figure, 50-95% of the image height
        unit = rng.uniform(0.5, 0.95) * height / 1.05
        top = rng.uniform(0.02, 0.98) * (height - 1.05 * unit)
        centre_x = rng.uniform(0.3, 0.7) * width
    elif mode < 0.9:  # upper body: the legs leave the frame at the bottom
        unit = rng.uniform(1.0, 1.5) * height / 1.05
        top = rng.uniform(0.03, 0.1) * height
        centre_x = rng.uniform(0.35, 0.65) * width
    else:  # near a side edge: an arm or a leg leaves the frame
        unit = rng.uniform(0.6, 0.95) * height / 1.05
        top = rng.uniform(0.02, 0.98) * (height - 1.05 * unit)
        inset = rng.uniform(0.06, 0.2) * unit
        centre_x = inset if rng.random() < 0.5 else width - 1 - inset
    return unit, np.array([centre_x, top + 0.52 * unit])


def _sample_figure(rng, width: int, height: int, front: bool) -> _Figure:
    """Poses a skeleton: torso lean, head tilt, arm and leg angles."""
    unit, pelvis = _place(rng, width, height)
    lean = rng.normal(0.0, 0.08)
    up = np.array([math.sin(lean), -math.cos(lean)])
    across = np.array([-up[1], up[0]])
    tilt = lean + rng.normal(0.0, 0.1)
    head_up = np.array([math.sin(tilt), -math.cos(tilt)])
    points = {"pelvis": pelvis}
    points["thorax"] = pelvis + up * 0.26 * unit
    points["upper_neck"] = pelvis + up * 0.37 * unit
    head = points["upper_neck"] + head_up * 0.062 * unit
    points["head_centre"] = head
    points["head_top"] = head + head_up * 0.064 * unit
    shoulder_half = rng.uniform(0.10, 0.12)
    hip_half = rng.uniform(0.065, 0.08)
    right_sign = -1.0 if front else 1.0  # facing us, the right is image-left
    for side, sign in (("right", right_sign), ("left", -right_sign)):
        outward = across * sign
        shoulder = pelvis + (up * 0.31 + outward * shoulder_half) * unit
        # Redraw arms whose elbow or wrist would hide behind the head (drawn
        # last); 20 tries practically always find one.
        for _ in range(20):
            raise_angle = rng.choice(
                [
                    rng.uniform(0.05, 0.6),  # hanging
                    rng.uniform(0.6, 1.9),  # lifted sideways
                    rng.uniform(1.9, 2.8),  # raised
                    -rng.uniform(0.1, 0.5),  # across the body
                ],
                p=[0.58, 0.25, 0.08, 0.09],
            )
            bend = float(np.clip(rng.normal(0.0, 0.7), -2.2, 2.2))
            elbow = shoulder + _direction(-up, outward, raise_angle) * (
                0.165 * unit
            )
            forearm = _direction(-up, outward, raise_angle + bend)
            wrist = elbow + forearm * 0.145 * unit
            clearance = min(
                np.hypot(*(elbow - head)), np.hypot(*(wrist - head))
            )
            if clearance > 0.11 * unit:
                break
        points[f"{side}_shoulder"] = shoulder
        points[f"{side}_elbow"] = elbow
        points[f"{side}_wrist"] = wrist
        points[f"{side}_hand"] = wrist + forearm * 0.05 * unit

        hip = pelvis + outward * hip_half * unit
        spread = rng.uniform(-0.05, 0.3)
        if rng.random() < 0.15:  # a step or a kick
            spread = rng.uniform(0.3, 0.6) * rng.choice([-1.0, 1.0])
        knee_bend = float(np.clip(rng.normal(0.0, 0.2), -0.6, 0.6))
        shin = float(np.clip(spread + knee_bend, -1.0, 1.0))
        down, out = np.array([0.0, 1.0]), np.array([sign, 0.0])
        knee = hip + _direction(down, out, spread) * 0.245 * unit
        points[f"{side}_hip"] = hip
        points[f"{side}_knee"] = knee
        points[f"{side}_ankle"] = knee + _direction(down, out, shin) * (
            0.235 * unit
        )
    return _Figure(
        points=points,
        unit=unit,
        up=up,
        across=across,
        head_up=head_up,
        shoulder_half=shoulder_half,
        hip_half=hip_half,
    )


def _torso(figure: _Figure, hem: float, hem_half: float) -> list:
    """Torso outline from the collar down to `hem` units above the pelvis."""
    shoulder = figure.shoulder_half
    side = [
        (0.34, 0.035),
        (0.325, shoulder - 0.01),
        (0.295, shoulder + 0.03),
        (0.22, shoulder - 0.005),
        (0.12, 0.085),
        (hem, hem_half),
    ]
    outline = side + [(up, -across) for up, across in reversed(side)]
    return [figure.at(up, across) for up, across in outline]


def _flare(figure: _Figure, waist: float, waist_half: float, length: float):
    """A skirt from `waist` units above the pelvis to `length` below."""
    hem_half = figure.hip_half + 0.05 + length * 0.3
    return [
        figure.at(waist, waist_half),
        figure.at(-length, hem_half),
        figure.at(-length, -hem_half),
        figure.at(waist, -waist_half),
    ]


def _draw_legs(canvas: _Canvas, figure: _Figure, outfit: _Outfit, sides):
    points, hip_half = figure.points, figure.hip_half
    for side in sides:  # skin, socks, shoes
        hip, knee = points[f"{side}_hip"], points[f"{side}_knee"]
        ankle = points[f"{side}_ankle"]
        canvas.limb(hip, knee, (0.045, 0.035), f"{side}_leg", outfit.skin)
        canvas.limb(knee, ankle, (0.035, 0.027), f"{side}_leg", outfit.skin)
        if outfit.socks:
            sock_top = ankle + (knee - ankle) * 0.3
            canvas.limb(sock_top, ankle, (0.03, 0.029), "socks", outfit.socks)
        foot = ankle + np.array([0.0, 0.028 * figure.unit])
        if outfit.shoes:
            canvas.ellipse(foot, (0.045, 0.03), f"{side}_shoe", outfit.shoes)
        else:
            canvas.ellipse(foot, (0.035, 0.022), f"{side}_leg", outfit.skin)
    if outfit.bottom == "skirt":
        skirt = _flare(figure, 0.08, hip_half + 0.025, outfit.skirt_length)
        canvas.polygon(skirt, "skirt", outfit.bottom_colour)
    if outfit.bottom != "pants" and outfit.top != "jumpsuits":
        return
    name = "jumpsuits" if outfit.top == "jumpsuits" else "pants"
    colour = outfit.top_colour if name == "jumpsuits" else outfit.bottom_colour
    waist = [
        figure.at(0.07, hip_half + 0.03),
        figure.at(-0.03, hip_half + 0.045),
        figure.at(-0.08, 0.0),
        figure.at(-0.03, -hip_half - 0.045),
        figure.at(0.07, -hip_half - 0.03),
    ]
    canvas.polygon(waist, name, colour)
    reach = outfit.trouser_length * 2.0  # 0..1 along the thigh, 1..2 shin
    for side in sides:
        hip, knee = points[f"{side}_hip"], points[f"{side}_knee"]
        ankle = points[f"{side}_ankle"]
        end = hip + (knee - hip) * min(reach, 1.0)
        canvas.limb(hip, end, (0.052, 0.043), name, colour)
        if reach > 1.0:
            end = knee + (ankle - knee) * (reach - 1.0)
            canvas.limb(knee, end, (0.043, 0.035), name, colour)


def _draw_torso(canvas: _Canvas, figure: _Figure, outfit: _Outfit) -> None:
    hip_half = figure.hip_half
    neck_base = figure.at(0.32, 0.0)
    neck = figure.points["upper_neck"]
    canvas.limb(neck, neck_base, (0.025, 0.028), "face", outfit.skin)
    if outfit.top == "dress":
        torso = _torso(figure, 0.0, hip_half + 0.03)
        canvas.polygon(torso, "dress", outfit.top_colour)
        skirt = _flare(figure, 0.1, 0.085, outfit.skirt_length + 0.05)
        canvas.polygon(skirt, "dress", outfit.top_colour)
    elif outfit.top == "coat":
        coat = _torso(figure, -0.17, hip_half + 0.06)
        canvas.polygon(coat, "coat", outfit.top_colour)
        if outfit.inner_colour and outfit.front:  # an open coat
            strip = [
                figure.at(0.335, 0.03),
                figure.at(0.0, 0.035),
                figure.at(0.0, -0.035),
                figure.at(0.335, -0.03),
            ]
            canvas.polygon(strip, "upper_clothes", outfit.inner_colour)
    else:
        torso = _torso(figure, -0.04, hip_half + 0.03)
        canvas.polygon(torso, outfit.top, outfit.top_colour)
    if outfit.scarf:
        start, end = figure.at(0.31, -0.05), figure.at(0.31, 0.05)
        canvas.limb(start, end, (0.022, 0.022), "scarf", outfit.scarf)
        tail = figure.at(0.16, 0.025)
        canvas.limb(
            figure.at(0.31, 0.0), tail, (0.02, 0.017), "scarf", outfit.scarf
        )


def _draw_arms(canvas: _Canvas, figure: _Figure, outfit: _Outfit, sides):
    reach = outfit.sleeve * 2.0  # 0..1 along the upper arm, 1..2 forearm
    for side in sides:  # skin, the sleeve over it, then the hand
        shoulder = figure.points[f"{side}_shoulder"]
        elbow = figure.points[f"{side}_elbow"]
        wrist = figure.points[f"{side}_wrist"]
        hand = figure.points[f"{side}_hand"]
        arm = f"{side}_arm"
        canvas.limb(shoulder, elbow, (0.03, 0.025), arm, outfit.skin)
        canvas.limb(elbow, wrist, (0.025, 0.021), arm, outfit.skin)
        if reach:
            end = shoulder + (elbow - shoulder) * min(reach, 1.0)
            canvas.limb(
                shoulder, end, (0.036, 0.031), outfit.top, outfit.top_colour
            )
            if reach > 1.0:
                end = elbow + (wrist - elbow) * (reach - 1.0)
                canvas.limb(
                    elbow, end, (0.031, 0.027), outfit.top, outfit.top_colour
                )
        if outfit.gloves:
            canvas.limb(wrist, hand, (0.024, 0.026), "glove", outfit.gloves)
        else:
            canvas.limb(wrist, hand, (0.021, 0.024), arm, outfit.skin)


def _draw_long_hair(canvas: _Canvas, figure: _Figure, outfit: _Outfit):
    length = 0.06 + outfit.long_hair
    hair = [
        figure.head_at(0.02, 0.056),
        figure.head_at(-length, 0.075),
        figure.head_at(-length, -0.075),
        figure.head_at(0.02, -0.056),
    ]
    canvas.polygon(hair, "hair", outfit.hair)


def _draw_head(canvas: _Canvas, figure: _Figure, outfit: _Outfit) -> None:
    head_up = figure.head_up
    if outfit.front:
        hair = figure.head_at(0.008, 0.0)
        canvas.ellipse(hair, (0.057, 0.072), "hair", outfit.hair, head_up)
        face = figure.head_at(-0.01, 0.0)
        canvas.ellipse(face, (0.046, 0.057), "face", outfit.skin, head_up)
        if outfit.sunglasses:
            for across in (-0.021, 0.021):
                lens = figure.head_at(0.004, across)
                glasses = (20, 20, 24)
                canvas.ellipse(
                    lens, (0.018, 0.012), "sunglasses", glasses, head_up
                )
    else:
        hair = figure.head_at(0.004, 0.0)
        canvas.ellipse(hair, (0.058, 0.074), "hair", outfit.hair, head_up)
    if outfit.hat:
        crown, brim = figure.head_at(0.055, 0.0), figure.head_at(0.04, 0.0)
        canvas.ellipse(crown, (0.062, 0.04), "hat", outfit.hat, head_up)
        canvas.ellipse(brim, (0.08, 0.014), "hat", outfit.hat, head_up)


def _draw_figure(canvas: _Canvas, rng, figure: _Figure, outfit: _Outfit):
    """Paints back to front. The head comes last, so head top and upper neck
    always land on hair, hat or face; arms come after the torso."""
    sides = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
    if outfit.long_hair and outfit.front:  # hanging behind the shoulders
        _draw_long_hair(canvas, figure, outfit)
    _draw_legs(canvas, figure, outfit, sides)
    _draw_torso(canvas, figure, outfit)
    if outfit.long_hair and not outfit.front:  # hanging over the back
        _draw_long_hair(canvas, figure, outfit)
    _draw_arms(canvas, figure, outfit, sides)
    _draw_head(canvas, figure, outfit)


def _draw_background(rng: np.random.Generator, width: int, height: int):
    """A two-colour gradient under random, partly transparent shapes, a
    little out of focus. Shape colours include skin tones and clothes-like
    colours, so colour alone never finds the person."""
    start, end = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = columns / width * math.cos(angle) + rows / height * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    pixels = start + ramp[..., None] * (end - start)
    image = Image.fromarray(pixels.astype(np.uint8)).convert("RGBA")
    shapes = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shapes)
    size = min(width, height)
    for _ in range(rng.integers(3, 11)):
        if rng.random() < 0.3:
            skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
            colour = _jitter(rng, skin)
        else:
            colour = _random_colour(rng)
        opacity = (int(rng.uniform(100, 256)),)
        outline = _jitter(rng, np.asarray(colour) * 0.6, 5.0) + opacity
        colour += opacity
        x, y = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        half_x, half_y = rng.uniform(0.04, 0.3, 2) * size
        box = (x - half_x, y - half_y, x + half_x, y + half_y)
        kind = rng.integers(4)
        if kind == 0:
            draw.rectangle(box, fill=colour, outline=outline)
        elif kind == 1:
            draw.ellipse(box, fill=colour, outline=outline)
        elif kind == 2:
            corners = rng.uniform(-1, 1, (3, 2)) * (half_x, half_y) + (x, y)
            corners = [tuple(corner) for corner in corners]
            draw.polygon(corners, fill=colour, outline=outline)
        else:  # limb-like bars, some of them skin-coloured
            other = np.array([x, y]) + rng.uniform(-0.4, 0.4, 2) * size
            bar_width = max(1, int(rng.uniform(0.02, 0.08) * size))
            draw.line([(x, y), tuple(other)], fill=colour, width=bar_width)
    image = Image.alpha_composite(image, shapes).convert("RGB")
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))


def _finish(
    rng, image: Image.Image, label: np.ndarray, parts: np.ndarray, unit
):
    """Shading, striped garments, dark part outlines, noise, a mild blur."""
    pixels = np.asarray(image, dtype=np.float32).copy()
    height, width = label.shape
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    person = label > 0
    if person.any():
        light = rng.uniform(0.0, 2.0 * math.pi)
        shade = (columns - columns[person].mean()) * math.cos(light)
        shade += (rows - rows[person].mean()) * math.sin(light)
        shade = np.clip(1.0 + 0.25 * shade / unit, 0.7, 1.25)
        pixels[person] *= shade[person][:, None]
    for name in (
        "upper_clothes",
        "dress",
        "coat",
        "pants",
        "jumpsuits",
        "skirt",
    ):
        mask = label == _CLASS[name]
        if not mask.any() or rng.random() > 0.35:
            continue
        angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(0.02, 0.06) * unit + 2.0
        phase = columns * math.cos(angle) + rows * math.sin(angle)
        stripes = np.where(np.sin(2 * math.pi * phase / period) > 0, 1.0, 0.8)
        pixels[mask] *= stripes[mask][:, None]
    # Outlines where one drawn part meets another, so that a sleeve in front
    # of a same-coloured torso still shows its shape.
    edges = np.zeros_like(person)
    edges[:, 1:] |= parts[:, 1:] != parts[:, :-1]
    edges[1:, :] |= parts[1:, :] != parts[:-1, :]
    pixels[edges] *= 0.78
    pixels += rng.normal(0.0, rng.uniform(2.0, 6.0), pixels.shape)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return np.asarray(out)


def _annotate(rng, figure: _Figure, width: int, height: int) -> np.ndarray:
    """`(16, 3)` joints in LIP order: integer pixels, NaN when outside the
    image or randomly unannotated, flag 1 for a few ("occluded")."""
    joints = np.full((NUM_JOINTS, 3), np.nan)
    for index, name in enumerate(LIP_JOINT_NAMES):
        x, y = np.round(figure.points[name])
        kind = name.rsplit("_", 1)[-1]
        unannotated = rng.random() < _UNANNOTATED.get(kind, _OTHER_UNANNOTATED)
        flag = 1.0 if rng.random() < _OCCLUDED else 0.0
        if not unannotated and 0 <= x < width and 0 <= y < height:
            joints[index] = (x, y, flag)
    return joints


def render_synthetic_sample(
    rng: np.random.Generator, min_size: int = 96, max_size: int = 192
) -> SyntheticSample:
    """Draws one figure on a cluttered background.

    Args:
        rng: the generator all randomness comes from.
        min_size: smallest image side in pixels.
        max_size: largest image side in pixels; width and height are drawn
            independently from `[min_size, max_size]`.

    Returns:
        A `SyntheticSample` whose label map and joints share one geometry.
    """
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    outfit = _sample_outfit(rng)
    figure = _sample_figure(rng, width, height, outfit.front)
    image = _draw_background(rng, width, height)
    label = Image.new("L", (width, height), 0)
    canvas = _Canvas(image, label, figure.unit)
    _draw_figure(canvas, rng, figure, outfit)
    label_map = np.asarray(label, dtype=np.uint8)
    parts = np.asarray(canvas.parts_image)
    return SyntheticSample(
        image=_finish(rng, image, label_map, parts, figure.unit),
        label=label_map,
        joints=_annotate(rng, figure, width, height),
    )


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per image: an image stays the same when the counts change.
    sequence = np.random.SeedSequence([seed, _SPLIT_CODES[split], index])
    return np.random.default_rng(sequence)


def _new_image_id(rng: np.random.Generator, taken: set[str]) -> str:
    while True:  # LIP-like "<digits>_<digits>", unique over all splits
        image_id = f"{rng.integers(1, 10**6)}_{rng.integers(10**5, 10**7)}"
        if image_id not in taken:
            taken.add(image_id)
            return image_id


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")


def _prepare_root(root: Path) -> None:
    """Creates `root`, or clears an earlier synthetic LIP in it; refuses any
    other non-empty folder (it could hold the real LIP)."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"out_dir {root} is not a directory.")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER_FILE).is_file():
            raise FileExistsError(
                f"out_dir {root} is not empty and holds no {MARKER_FILE}; "
                "refusing to write a synthetic LIP into it."
            )
        log.info("replacing the synthetic LIP in %s", root)
        for folder in _RELEASE_FOLDERS:
            if (root / folder).is_dir():
                shutil.rmtree(root / folder)
    root.mkdir(parents=True, exist_ok=True)


def _write_split(layout, split, count, seed, sizes, taken, bar) -> list:
    """Writes one split's images (and labels, ids, pose CSV); returns its
    `(image_id, joints)` rows (joints None for the test split)."""
    labelled = split != "test"
    layout.image_dir(split).mkdir(parents=True, exist_ok=True)
    if labelled:
        layout.label_dir(split).mkdir(parents=True, exist_ok=True)
        layout.pose_csv(split).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        rng = _image_rng(seed, split, index)
        image_id = _new_image_id(rng, taken)
        sample = render_synthetic_sample(rng, *sizes)
        image_path = layout.image_path(split, image_id)
        Image.fromarray(sample.image).save(image_path, quality=JPEG_QUALITY)
        if labelled:
            label_path = layout.label_path(split, image_id)
            Image.fromarray(sample.label).save(label_path)
        rows.append((image_id, sample.joints if labelled else None))
        bar.update()
    rows.sort(key=lambda row: row[0])  # the real files are sorted by name
    ids = "".join(f"{image_id}\n" for image_id, _ in rows)
    layout.id_file(split).write_text(ids)
    if labelled:
        write_pose_csv(layout.pose_csv(split), rows)
    return rows


def write_synthetic_lip(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int,
    min_size: int = 96,
    max_size: int = 192,
    num_test: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes a synthetic LIP in the release layout (see module docstring).

    The same arguments give byte-identical files: image `index` of `split`
    draws everything from its own `SeedSequence([seed, split, index])`, so
    an image also stays the same when the other counts change.

    Args:
        out_dir: the LIP root; created if needed. It must be empty or hold
            an earlier synthetic LIP (recognised by `synthetic_lip.json`),
            whose release folders are then replaced.
        num_train: number of training images.
        num_val: number of validation images.
        seed: non-negative int seed.
        min_size: smallest image side in pixels, >= 32.
        max_size: largest image side in pixels, >= `min_size`.
        num_test: number of unlabelled test images (0: no `Testing_images`).
        progress: show a tqdm progress bar on stderr.

    Returns:
        A JSON-able summary: `root`, `seed`, `min_size`, `max_size`,
        `counts` per split, `joints` (`total`, `missing`, `occluded` over
        train and val) and `paths` (relative to `root`).

    Raises:
        TypeError: a count, the seed or a size is not an int.
        ValueError: a negative count or seed, no images at all, or sizes
            out of range.
        FileExistsError: `out_dir` holds files but no synthetic LIP.
    """
    for name, value in (
        ("num_train", num_train),
        ("num_val", num_val),
        ("num_test", num_test),
        ("seed", seed),
        ("min_size", min_size),
        ("max_size", max_size),
    ):
        _check_count(name, value)
    if num_train + num_val + num_test == 0:
        raise ValueError("num_train, num_val and num_test are all 0.")
    if min_size < 32:
        raise ValueError(f"min_size must be >= 32, got {min_size}.")
    if max_size < min_size:
        raise ValueError(
            f"max_size must be >= min_size ({min_size}), got {max_size}."
        )
    layout = LIPLayout(Path(out_dir))
    _prepare_root(layout.root)
    counts = {"train": int(num_train), "val": int(num_val)}
    if num_test:
        counts["test"] = int(num_test)
    summary: dict[str, Any] = {
        "generator": __name__,
        "seed": int(seed),
        "min_size": int(min_size),
        "max_size": int(max_size),
        "counts": counts,
    }
    marker = layout.root / MARKER_FILE
    marker.write_text(json.dumps({**summary, "complete": False}, indent=2))
    log.info("writing a synthetic LIP to %s: %s", layout.root, counts)

    taken: set[str] = set()
    joints = {"total": 0, "missing": 0, "occluded": 0}
    paths = {}
    total = sum(counts.values())
    with tqdm(
        total=total, desc="synthetic LIP", unit="image", disable=not progress
    ) as bar:
        for split, count in counts.items():
            sizes = (int(min_size), int(max_size))
            rows = _write_split(
                layout, split, count, int(seed), sizes, taken, bar
            )
            paths[f"{split}_images"] = layout.image_dir(split)
            paths[f"{split}_ids"] = layout.id_file(split)
            if split == "test":
                continue
            paths[f"{split}_labels"] = layout.label_dir(split)
            paths[f"{split}_pose_csv"] = layout.pose_csv(split)
            for _, split_joints in rows:
                present = np.isfinite(split_joints[:, 0])
                joints["total"] += NUM_JOINTS
                joints["missing"] += int((~present).sum())
                joints["occluded"] += int((split_joints[present, 2] == 1).sum())
    summary["joints"] = joints
    summary["paths"] = {
        key: path.relative_to(layout.root).as_posix()
        for key, path in paths.items()
    }
    marker.write_text(json.dumps({**summary, "complete": True}, indent=2))
    log.info(
        "wrote %d images to %s (%d of %d joints missing)",
        total,
        layout.root,
        joints["missing"],
        joints["total"],
    )
    return {"root": str(layout.root), **summary}
