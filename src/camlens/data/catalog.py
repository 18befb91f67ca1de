"""What ``camlens make-dataset`` can draw: shapes, shortcut kinds, tag positions."""

SHAPES = ("circle", "square", "triangle", "star", "cross")
DEFAULT_CLASSES = ("circle", "square", "triangle")
SHORTCUTS = ("corner-tag", "stripe", "token", "coin")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "random-corner")
