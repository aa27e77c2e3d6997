"""Small PNG pictures for Dagster metadata, so users look before they read.

Pure Pillow/numpy; the assets embed the bytes as markdown images.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nodule_pipeline.hashing.training import EpochStats

LUNG_WINDOW = (-600.0, 1500.0)
LABEL_COLOURS = {0: (60, 180, 75), 1: (230, 25, 75)}
"""Benign green, malignant red: the frame colour of each ROI tile."""


def window(hu: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU to 8-bit grey with a radiology window (lung window by default)."""
    low = level - width / 2
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def grey_tile(hu: np.ndarray, side: int, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> Image.Image:
    """An HU image in a window, scaled to ``side`` pixels square without smoothing (pixels stay visible)."""
    return Image.fromarray(window(hu, level, width)).resize((side, side), Image.NEAREST)


def roi_png(hu: np.ndarray, zoom: int = 4) -> bytes:
    """One ROI in the lung window as a PNG, ``zoom`` screen pixels per CT pixel, for a page: made
    quickly rather than small."""
    return to_png(grey_tile(hu, hu.shape[0] * zoom), optimize=False)


def to_png(image: Image.Image, optimize: bool = True) -> bytes:
    """PNG bytes; ``optimize`` makes them smaller for metadata that is stored, at ~10 ms a picture."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def roi_montage(images: np.ndarray, labels: np.ndarray, max_tiles: int = 48, zoom: int = 2, columns: int = 8) -> bytes:
    """Grid of ROIs in the lung window, each framed in its label's colour."""
    count = min(len(images), max_tiles)
    tile = images.shape[1] * zoom + 4 if count else 4
    rows = max(1, -(-count // columns))
    canvas = Image.new("RGB", (columns * tile, rows * tile), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for index in range(count):
        grey = grey_tile(images[index], tile - 4)
        x, y = (index % columns) * tile, (index // columns) * tile
        draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=LABEL_COLOURS.get(int(labels[index]), (128, 128, 128)))
        canvas.paste(grey.convert("RGB"), (x + 2, y + 2))
    return to_png(canvas)


def mask_overlay(hu_slice: np.ndarray, mask_slice: np.ndarray, size: int = 256) -> bytes:
    """One axial slice with the lung mask tinted, downsized to a thumbnail."""
    grey = window(hu_slice).astype(np.float32)
    rgb = np.stack([grey, grey, grey], axis=-1)
    rgb[mask_slice] = rgb[mask_slice] * 0.55 + np.array([0, 120, 255]) * 0.45
    image = Image.fromarray(rgb.astype(np.uint8))
    image.thumbnail((size, size))
    return to_png(image)


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown that shows the PNG inline (Dagster renders it in the asset's metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


CAPTION_FONT_SIZE = 10
"""Caption text height in pixels: a full LIDC nodule id (``LIDC-IDRI-0526-N01``) fits one line of
a tile at zoom 3."""


def caption_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font at :data:`CAPTION_FONT_SIZE` (its fixed bitmap font without FreeType)."""
    return ImageFont.load_default(size=CAPTION_FONT_SIZE)


def hit_caption(rank: int, nodule_id: str, detail: str = "") -> str:
    """A result tile's caption: its rank (and ``detail``, e.g. the Hamming distance) over the
    whole nodule id, the id users search with, never cut."""
    return f"#{rank} {detail}".rstrip() + f"\n{nodule_id}"


def wrap_caption(caption: str, width: float, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> list[str]:
    """The caption as lines at most ``width`` pixels wide in ``font``: its own lines, broken further
    after spaces, then after hyphens, then between characters, so that no character is lost (a
    space where a line breaks is dropped)."""
    lines: list[str] = []
    for paragraph in caption.split("\n"):
        line = ""
        for piece in re.findall(r"[^ -]*[ -]+|[^ -]+", paragraph):
            if font.getlength((line + piece).rstrip()) <= width:
                line += piece
                continue
            if line.strip():
                lines.append(line.rstrip())
            line = ""
            for character in piece:  # a piece wider than the tile: broken between characters
                if line and font.getlength((line + character).rstrip()) > width:
                    lines.append(line)
                    line = ""
                line += character
        lines.append(line.rstrip())
    return lines


@dataclass(frozen=True)
class CaptionLine:
    """One caption line as drawn: its tile's left and right edges, where it starts, its text."""

    tile: tuple[int, int]
    xy: tuple[int, int]
    text: str


@dataclass(frozen=True)
class Montage:
    """A picture of tiles and the caption lines drawn on it."""

    image: Image.Image
    captions: list[CaptionLine]

    def png(self) -> bytes:
        return to_png(self.image)


def search_results(
    query: np.ndarray,
    query_caption: str,
    results: Sequence[np.ndarray],
    result_labels: Sequence[int],
    result_captions: Sequence[str],
    zoom: int = 3,
) -> Montage:
    """The query beside its results, each framed in its label's colour and captioned in full
    (wrapped to its tile, the caption band as tall as the longest caption)."""
    font = caption_font()
    side = query.shape[0] * zoom
    tile = side + 6
    entries = [(query, None, query_caption), *zip(results, result_labels, result_captions, strict=True)]
    wrapped = [wrap_caption(caption, tile - 4, font) for _, _, caption in entries]
    step = max(font.getbbox(line)[3] for lines in wrapped for line in [*lines, "Ag"]) + 1
    caption_h = step * max(len(lines) for lines in wrapped) + 4
    canvas = Image.new("RGB", (len(entries) * tile + 10, tile + caption_h), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    placed: list[CaptionLine] = []
    for position, ((image, label, _), lines) in enumerate(zip(entries, wrapped, strict=True)):
        x = position * tile + (10 if position else 0)
        frame = (255, 255, 255) if label is None else LABEL_COLOURS.get(int(label), (128, 128, 128))
        draw.rectangle([x, 0, x + tile - 1, tile - 1], fill=frame)
        canvas.paste(grey_tile(image, side).convert("RGB"), (x + 3, 3))
        for line, text in enumerate(lines):
            placed.append(CaptionLine((x, x + tile), (x + 2, tile + 2 + step * line), text))
            draw.text(placed[-1].xy, text, fill=(230, 230, 230), font=font)
    return Montage(canvas, placed)


def training_curves_figure(history: Sequence[EpochStats], selected_epoch: int, title: str) -> Figure:
    """Cross-entropy and accuracy per epoch, training (solid) and validation (dashed) when there was
    one, with the epoch whose weights were kept marked; the axis names validation only then."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.epoch for h in history]
    validated = bool(history) and history[0].val_loss is not None
    figure, loss_axis = plt.subplots(figsize=(5, 3), dpi=80)
    accuracy_axis = loss_axis.twinx()
    loss_axis.plot(epochs, [h.loss for h in history], color="tab:red", marker="o", markersize=2)
    accuracy_axis.plot(epochs, [h.accuracy for h in history], color="tab:blue", marker="o", markersize=2)
    if validated:
        loss_axis.plot(epochs, [h.val_loss for h in history], color="tab:red", linestyle="--")
        accuracy_axis.plot(epochs, [h.val_accuracy for h in history], color="tab:blue", linestyle="--")
    loss_axis.axvline(selected_epoch, color="grey", linewidth=1, linestyle=":")
    kept = f"kept: {selected_epoch}; dashed: validation" if validated else f"kept: {selected_epoch}"
    loss_axis.set_xlabel(f"epoch ({kept})")
    loss_axis.set_ylabel("cross-entropy", color="tab:red")
    accuracy_axis.set_ylabel("accuracy", color="tab:blue")
    accuracy_axis.set_ylim(0, 1)
    loss_axis.set_title(title)
    figure.tight_layout()
    return figure


def training_curves(history: Sequence[EpochStats], selected_epoch: int, title: str) -> bytes:
    """:func:`training_curves_figure` as a PNG."""
    import matplotlib.pyplot as plt

    figure = training_curves_figure(history, selected_epoch, title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
