"""Turn heat maps into pictures: colour maps, overlays on the input image, top-k figures.

Every function here is plain and stateless. Heat maps are float arrays in ``[0, 1]`` that are
already at the image's resolution (``(H, W)`` for an image of ``W x H`` pixels). Figures are built
with the object-oriented :class:`matplotlib.figure.Figure` API, never ``pyplot``, so rendering is
thread-safe and needs no GUI backend.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from camlens.writers import atomic_path

__all__ = [
    "colorize",
    "colormap_indices",
    "colormap_table",
    "montage",
    "outline",
    "overlay",
    "resize_mask",
    "save_figure",
    "topk_figure",
]

_SUGGESTED_COLORMAPS = ("jet", "viridis", "inferno", "magma", "turbo")

#: Width of one panel of :func:`topk_figure`, in inches.
PANEL_INCHES = 3.0


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Map a heat map in ``[0, 1]`` to RGB colours with a matplotlib colour map.

    Parameters
    ----------
    heatmap : (H, W) array_like of float
        Heat map. Values are clipped to ``[0, 1]``; NaN is treated as 0.
    colormap : str, optional
        Name of any colour map in :data:`matplotlib.colormaps` (default ``"jet"``).

    Returns
    -------
    rgb : (H, W, 3) ndarray of uint8
        The colour of each pixel, each channel rounded to the nearest of 0..255.

    Raises
    ------
    ValueError
        If ``heatmap`` is not two-dimensional or ``colormap`` is not a known colour map.

    Examples
    --------
    >>> rgb = colorize(np.array([[0.0, 1.0]]))
    >>> rgb.shape, rgb.dtype
    ((1, 2, 3), dtype('uint8'))
    >>> rgb[0, 0].tolist()  # the dark blue end of "jet"
    [0, 0, 128]
    """
    values = np.asarray(heatmap)
    if values.ndim != 2:
        raise ValueError(f"heatmap must be a 2-D (H, W) array, got shape {values.shape}")
    table = colormap_table(colormap)
    return np.take(table, colormap_indices(values, len(table)), axis=0)  # 4 x faster than []


@functools.lru_cache(maxsize=32)
def colormap_table(colormap: str = "jet") -> np.ndarray:
    """The colours of a colour map's entries, (N, 3) uint8 (N = 256 for the usual maps), each
    channel rounded to the nearest of 0..255: ``colorize(m) == table[colormap_indices(m)]``.

    Example:
        >>> colormap_table("jet").shape
        (256, 3)
    """
    cmap = _get_colormap(colormap)
    table = np.rint(cmap(np.arange(cmap.N))[:, :3] * 255.0).astype(np.uint8)
    table.flags.writeable = False
    return table


def colormap_indices(heatmap: np.ndarray, n: int = 256) -> np.ndarray:
    """The entry of an ``n``-colour map each value of a map in [0, 1] takes, as matplotlib
    picks it: ``min(floor(n * v), n - 1)`` (NaN as 0, values clipped to [0, 1]); uint16 for
    the table look-up, uint8 when ``n <= 256``. Computed in the map's own float precision (no
    float64 copy of a large map).

    Example:
        >>> colormap_indices(np.array([[0.0, 0.5, 1.0]])).tolist()
        [[0, 128, 255]]
    """
    values = np.asarray(heatmap)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    values = np.clip(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    indices = np.minimum(values * n, n - 1)  # scaling by n is exact for powers of two
    return indices.astype(np.uint8 if n <= 256 else np.uint16)


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    *,
    colormap: str = "jet",
    alpha: float = 0.5,
    box: Sequence[float] | None = None,
    box_color: tuple[int, int, int] | str = (255, 255, 255),
    box_width: int | None = None,
) -> Image.Image:
    """Blend a coloured heat map over an image, optionally outlining a box.

    Each pixel is ``(1 - alpha) * image + alpha * colorize(heatmap)``, rounded to uint8.

    Parameters
    ----------
    image : PIL.Image.Image
        The input image; converted to RGB.
    heatmap : (H, W) array_like of float
        Heat map in ``[0, 1]`` at the image's resolution: ``H == image.height`` and
        ``W == image.width``.
    colormap : str, optional
        Matplotlib colour map name (default ``"jet"``), see :func:`colorize`.
    alpha : float, optional
        Weight of the heat map, in ``[0, 1]`` (default 0.5). 0 returns the image unchanged,
        1 returns the coloured heat map.
    box : sequence of 4 floats, optional
        ``[x0, y0, x1, y1]`` in image pixels, with ``x1`` and ``y1`` exclusive edges: the box
        covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``. Coordinates are rounded to
        whole pixels and the box is clipped to the image; a box that misses the image entirely
        draws nothing.
    box_color : tuple of 3 ints or str, optional
        Outline colour, anything PIL accepts (default white).
    box_width : int, optional
        Outline width in pixels, drawn inward from the box's edges. Default
        ``max(1, round(min(W, H) / 150))``.

    Returns
    -------
    PIL.Image.Image
        A new RGB image of the same size as ``image``.

    Raises
    ------
    ValueError
        If the heat map's shape differs from ``(image.height, image.width)``, ``alpha`` is
        outside ``[0, 1]``, ``box`` does not hold 4 finite numbers or ``box_width < 1``.

    Examples
    --------
    >>> image = Image.new("RGB", (64, 48), (40, 40, 40))
    >>> heat = np.zeros((48, 64))
    >>> heat[10:30, 20:50] = 1.0
    >>> out = overlay(image, heat, alpha=0.5, box=[20, 10, 50, 30])
    >>> out.size, out.mode
    ((64, 48), 'RGB')
    >>> out.getpixel((20, 10))  # on the box outline
    (255, 255, 255)
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.asarray(heatmap)
    expected = (image.height, image.width)
    if heat.shape != expected:
        raise ValueError(
            f"heatmap shape {heat.shape} does not match the image's (height, width) {expected}; "
            "resize the heat map to the image first"
        )
    base = np.asarray(image.convert("RGB"))
    colours = colorize(heat, colormap)
    index = base.astype(np.uint16)
    index <<= 8
    index |= colours
    blended = np.take(blend_table(alpha), index)
    out = Image.fromarray(blended, mode="RGB")
    if box is not None:
        _draw_box(out, box, box_color, box_width)
    return out


@functools.lru_cache(maxsize=8)
def blend_table(alpha: float) -> np.ndarray:
    """Every blend of two uint8 values, flat (65536,) uint8: entry ``256 * a + b`` is
    ``rint((1 - alpha) * a + alpha * b)``, computed once in float64, so that an overlay's blend
    is one table look-up per channel (exact, and about 8 x faster than the arithmetic).

    Example:
        >>> int(blend_table(0.5)[256 * 10 + 20]), int(blend_table(0.25)[256 * 0 + 255])
        (15, 64)
    """
    values = np.arange(256, dtype=np.float64)
    mixed = (1.0 - alpha) * values[:, None] + alpha * values[None, :]
    table = np.clip(np.rint(mixed), 0, 255).astype(np.uint8).ravel()
    table.flags.writeable = False
    return table


def gradient_picture(gradient: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """An input gradient (C, H, W) as an RGB picture, the way the Grad-CAM paper shows guided
    backpropagation: centred on grey, ``0.5 + 0.1 * (g - mean) / std``, clipped to [0, 1].

    Parameters:
        gradient: (3, H, W) or (1, H, W) gradient with respect to the model input.
        size: (width, height) of the picture (bilinear resize; default: the gradient's).

    Returns:
        An RGB ``PIL.Image.Image``.

    Example:
        >>> g = np.zeros((3, 2, 2), dtype=np.float32); g[0, 0, 0] = 1.0
        >>> picture = gradient_picture(g)
        >>> picture.size, picture.getpixel((0, 0)), picture.getpixel((1, 1))
        ((2, 2), (212, 120, 120), (120, 120, 120))
    """
    values = np.asarray(gradient, dtype=np.float64)
    if values.ndim != 3 or values.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3, H, W) or (1, H, W) gradient, got {values.shape}")
    values = (values - values.mean()) / (values.std() + 1e-5) * 0.1 + 0.5
    pixels = np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    picture = Image.fromarray(np.repeat(pixels, 3 // len(pixels), axis=0).transpose(1, 2, 0))
    return picture.resize(size, Image.BILINEAR) if size and size != picture.size else picture


def topk_figure(
    image: Image.Image,
    overlays: Sequence[Image.Image],
    titles: Sequence[str],
    *,
    suptitle: str | None = None,
) -> Figure:
    """Lay out the input image and its class-map overlays in one row (like Figure 3 of CAM).

    Parameters
    ----------
    image : PIL.Image.Image
        The input image, shown first.
    overlays : sequence of PIL.Image.Image
        The ``K`` overlays, e.g. from :func:`overlay`, one per top-k class.
    titles : sequence of str
        Either ``K`` titles, one per overlay (the input panel is then titled ``"input"``), or
        ``K + 1`` titles, the first for the input image.
    suptitle : str, optional
        A title over the whole figure.

    Returns
    -------
    matplotlib.figure.Figure
        A figure with ``1 + K`` axes, axis lines and ticks off, 3 inches wide per panel.
        Titles are shown literally (a ``$`` never starts mathtext).
        It is not registered with ``pyplot``; save it with :func:`save_figure`.

    Raises
    ------
    ValueError
        If the number of titles is neither ``K`` nor ``K + 1``.

    Examples
    --------
    >>> image = Image.new("RGB", (32, 32))
    >>> heat = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    >>> fig = topk_figure(image, [overlay(image, heat)], ["tabby (281) 0.91"])
    >>> [ax.get_title() for ax in fig.axes]
    ['input', 'tabby (281) 0.91']
    """
    overlays = list(overlays)
    titles = [str(t) for t in titles]
    if len(titles) == len(overlays):
        titles = ["input", *titles]
    elif len(titles) != len(overlays) + 1:
        raise ValueError(
            f"got {len(titles)} titles for {len(overlays)} overlays; "
            f"give {len(overlays)} (one per overlay) or {len(overlays) + 1} (input first)"
        )
    panels = [image, *overlays]
    # Panels are PANEL_INCHES wide; the row is as tall as its tallest panel, plus titles.
    aspect = max(panel.height / max(panel.width, 1) for panel in panels)
    aspect = min(max(aspect, 0.25), 3.0)
    height = PANEL_INCHES * aspect + 0.5 + (0.4 if suptitle else 0.0)
    figure = Figure(figsize=(PANEL_INCHES * len(panels), height), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel, title in zip(axes, panels, titles, strict=True):
        ax.imshow(np.asarray(panel.convert("RGB")), interpolation="nearest")
        ax.set_title(_plain_text(title), fontsize=10)
        ax.set_axis_off()
    if suptitle:
        figure.suptitle(_plain_text(suptitle))
    return figure


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a figure as PNG, atomically.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        The figure, e.g. from :func:`topk_figure`.
    path : str or os.PathLike
        Destination; parent folders are created. A reader sees either the old file or the whole
        new one, never a partial PNG.
    dpi : int, optional
        Resolution in dots per inch (default 100).

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> fig = topk_figure(Image.new("RGB", (8, 8)), [], [])
    >>> save_figure(fig, "figures/fig.png")
    PosixPath('figures/fig.png')
    >>> Image.open("figures/fig.png").size  # pixels at dpi=100
    (300, 350)
    """
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return Path(path)


def _plain_text(text: str) -> str:
    """Escape ``$`` so matplotlib shows labels and file names literally, never as mathtext."""
    return str(text).replace("$", r"\$")


def _get_colormap(name: str) -> matplotlib.colors.Colormap:
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        suggestions = ", ".join(_SUGGESTED_COLORMAPS)
        raise ValueError(
            f"unknown colormap {name!r}; try one of {suggestions} (any matplotlib colormap name)"
        ) from None


def _draw_box(
    image: Image.Image,
    box: Sequence[float],
    color: tuple[int, int, int] | str,
    width: int | None,
) -> None:
    """Outline ``box`` (exclusive right/bottom edges) on ``image`` in place."""
    coords = [float(v) for v in box]
    if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
        raise ValueError(f"box must be 4 finite numbers [x0, y0, x1, y1], got {list(box)!r}")
    w, h = image.size
    if width is None:
        width = max(1, round(min(w, h) / 150))
    width = int(width)
    if width < 1:
        raise ValueError(f"box_width must be at least 1, got {width}")
    x0, y0, x1, y1 = (round(v) for v in coords)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    # Clip to the image; edges stay exclusive.
    x0, x1 = max(x0, 0), min(x1, w)
    y0, y1 = max(y0, 0), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return  # nothing of the box is inside the image
    # PIL's rectangle includes its far corner, so pass the last covered pixel.
    corners = (x0, y0, x1 - 1, y1 - 1)
    draw = ImageDraw.Draw(image)
    if 2 * width >= min(x1 - x0, y1 - y0):
        # The outline covers the whole box. PIL's outline spills past thin boxes, so fill.
        draw.rectangle(corners, fill=color)
    else:
        draw.rectangle(corners, outline=color, width=width)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask (H, W) resized to ``size`` (width, height) by nearest neighbour.

    Example:
        >>> resize_mask(np.array([[True, False]]), (4, 2)).astype(int)
        array([[1, 1, 0, 0],
               [1, 1, 0, 0]])
    """
    region = np.asarray(mask, dtype=bool)
    if region.shape == (size[1], size[0]):
        return region
    picture = Image.fromarray(region.astype(np.uint8) * 255)
    return np.asarray(picture.resize(tuple(size), Image.Resampling.NEAREST)) > 127


def outline(
    image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """A copy of ``image`` with the boundary of ``mask`` drawn over it in ``color``.

    The mask (H, W) is resized to the image (nearest neighbour); its boundary is the mask's
    pixels that have a neighbour outside it (4-connectivity, ``scipy.ndimage``).

    Parameters:
        image: an RGB picture (e.g. an overlay).
        mask: (H, W) bool, the region.
        color: the line's colour.

    Returns:
        A new RGB image.

    Example:
        >>> mask = np.zeros((4, 4), bool)
        >>> mask[1:3, 1:3] = True
        >>> np.asarray(outline(Image.new("RGB", (4, 4)), mask))[..., 0]
        array([[  0,   0,   0,   0],
               [  0, 255, 255,   0],
               [  0, 255, 255,   0],
               [  0,   0,   0,   0]], dtype=uint8)
    """
    from scipy import ndimage

    region = resize_mask(mask, image.size)
    edge = region & ~ndimage.binary_erosion(region, border_value=0)
    pixels = np.array(image.convert("RGB"))
    pixels[edge] = color
    return Image.fromarray(pixels)


#: Height in pixels of the band above each tile of :func:`montage` that holds its label.
MONTAGE_LABEL_HEIGHT = 14
#: Gap in pixels between the tiles of :func:`montage` and around them.
MONTAGE_GAP = 2


def montage(
    volume: np.ndarray,
    volume_map: np.ndarray,
    *,
    step: int | None = None,
    columns: int | None = None,
    scale: int | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
    max_tiles: int = 16,
) -> Image.Image:
    """A slice montage of a volume: every ``step``-th axial slice with its map over it.

    Each tile is :func:`overlay` of the windowed slice (grey) and the map's slice, enlarged
    ``scale`` times (nearest neighbour: one voxel becomes ``scale x scale`` pixels), under a
    band of :data:`MONTAGE_LABEL_HEIGHT` pixels that says the slice number (``z=12``). Tiles go
    left to right, top to bottom, :data:`MONTAGE_GAP` pixels apart.

    Parameters
    ----------
    volume : (D, H, W) array_like
        The windowed volume: uint8, or floats in [0, 1] (scaled by 255 and rounded).
    volume_map : (D, H, W) array_like of float
        The map in [0, 1] at the volume's size.
    step : int, optional
        Show slices ``0, step, 2 step, ...``; default ``ceil(D / max_tiles)``.
    columns : int, optional
        Tiles per row; default ``ceil(sqrt(number of tiles))``.
    scale : int, optional
        Enlargement of each tile; default the smallest integer that makes a tile at least
        96 pixels wide (1 for wider slices).
    colormap, alpha
        As for :func:`overlay`.
    max_tiles : int, optional
        The number of tiles the default ``step`` aims at (16).

    Returns
    -------
    PIL.Image.Image
        An RGB image. ``image.info["tiles"]`` lists ``(slice, x, y)`` per tile: the slice
        number and the pixel where the slice's first voxel (row 0, column 0) is drawn.

    Raises
    ------
    ValueError
        The two arrays are not 3-D of the same shape, or ``step``, ``columns`` or ``scale``
        is below 1.

    Examples
    --------
    >>> vol = np.zeros((8, 4, 6), np.uint8); heat = np.zeros((8, 4, 6)); heat[4, 1, 2] = 1.0
    >>> image = montage(vol, heat, step=4, scale=2)
    >>> image.size, image.info["tiles"]
    ((30, 26), [(0, 2, 16), (4, 16, 16)])
    >>> image.getpixel((16 + 2 * 2, 16 + 1 * 2))  # the hot voxel, half jet's dark red
    (64, 0, 0)
    """
    grey, heat = _montage_arrays(volume, volume_map)
    depth, height, width = grey.shape
    step = math.ceil(depth / max(1, max_tiles)) if step is None else int(step)
    scale = max(1, math.ceil(96 / width)) if scale is None else int(scale)
    picked = list(range(0, depth, max(1, step)))
    columns = math.ceil(math.sqrt(len(picked))) if columns is None else int(columns)
    if min(step, scale, columns) < 1:
        raise ValueError(
            f"montage: step, columns and scale must be at least 1, got step={step}, "
            f"columns={columns}, scale={scale}"
        )
    tile_w, tile_h = width * scale, height * scale + MONTAGE_LABEL_HEIGHT
    rows = math.ceil(len(picked) / columns)
    canvas = Image.new(
        "RGB",
        (
            MONTAGE_GAP + columns * (tile_w + MONTAGE_GAP),
            MONTAGE_GAP + rows * (tile_h + MONTAGE_GAP),
        ),
        (0, 0, 0),
    )
    draw = ImageDraw.Draw(canvas)
    tiles = []
    for position, z in enumerate(picked):
        x = MONTAGE_GAP + (position % columns) * (tile_w + MONTAGE_GAP)
        y = MONTAGE_GAP + (position // columns) * (tile_h + MONTAGE_GAP)
        tile = overlay(Image.fromarray(grey[z]), heat[z], colormap=colormap, alpha=alpha)
        if scale > 1:
            tile = tile.resize((tile_w, height * scale), Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y + MONTAGE_LABEL_HEIGHT))
        draw.text((x + 1, y + 1), f"z={z}", fill=(255, 255, 255))
        tiles.append((z, x, y + MONTAGE_LABEL_HEIGHT))
    canvas.info["tiles"] = tiles
    return canvas


def _montage_arrays(volume: np.ndarray, volume_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 grey volume, float map) checked to be 3-D and of one shape."""
    values = np.asarray(volume)
    heat = np.asarray(volume_map)
    if values.ndim != 3 or heat.shape != values.shape:
        raise ValueError(
            f"montage needs a (D, H, W) volume and a map of the same shape, got {values.shape} "
            f"and {heat.shape}; resize the map to the volume first"
        )
    if values.dtype != np.uint8:
        values = np.clip(np.rint(np.nan_to_num(values.astype(np.float64)) * 255.0), 0, 255)
        values = values.astype(np.uint8)
    return values, heat
