"""Class names from a file: plain text (one per line) or JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from camlens.errors import ConfigError

_JSON_FORMS = (
    'a list ["cat", "dog"], an index -> name object {"0": "cat", "1": "dog"}, or a '
    'name -> index object {"cat": 0, "dog": 1}'
)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Read class names, in class-index order, from a text or JSON file.

    Parameters:
        path: a ``.json`` file holding a list ``["cat", "dog"]``, an object from index to name
            ``{"0": "cat", "1": "dog"}`` or from name to index ``{"cat": 0, "dog": 1}`` (as
            torchvision's ``ImageFolder.class_to_idx``); any other file is text with one name
            per line (surrounding spaces removed, blank lines ignored).

    Returns:
        The names; ``names[i]`` is the name of class ``i``.

    Raises:
        ConfigError: the file is missing, not valid JSON, or its indices are not 0..n-1.

    Example:
        >>> _ = Path("labels.txt").write_text("cat\\ndog\\n")
        >>> read_labels("labels.txt")
        ['cat', 'dog']
        >>> _ = Path("classes.json").write_text('{"dog": 1, "cat": 0}')  # ImageFolder.class_to_idx
        >>> read_labels("classes.json")
        ['cat', 'dog']
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read labels file {path}: {error}") from error
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"labels file {path} is not valid JSON: {error}") from error
    return _labels_from_json(content, path)


def check_label_count(labels: list[str], num_classes: int | None, source: str) -> None:
    """Raise ``ConfigError`` when ``labels`` does not name exactly ``num_classes`` classes."""
    if num_classes is not None and len(labels) != num_classes:
        raise ConfigError(
            f"{source} names {len(labels)} classes but the model has {num_classes} outputs; "
            "give one label per class, in class-index order"
        )


def _labels_from_json(content: object, path: Path) -> list[str]:
    if isinstance(content, list) and all(isinstance(name, str) for name in content):
        return list(content)
    if isinstance(content, dict) and content:
        if all(
            isinstance(index, int) and not isinstance(index, bool) for index in content.values()
        ):
            by_index = {index: name for name, index in content.items()}
        elif all(key.strip().lstrip("-").isdigit() for key in content):
            by_index = {int(key): name for key, name in content.items()}
        else:
            by_index = None
        if by_index is not None:
            return _in_index_order(by_index, len(content), path)
    raise ConfigError(f"labels file {path} must hold {_JSON_FORMS}")


def _in_index_order(by_index: dict[int, object], count: int, path: Path) -> list[str]:
    if sorted(by_index) != list(range(count)):
        raise ConfigError(
            f"labels file {path}: class indices must be 0..{count - 1}, each once, got "
            f"{sorted(by_index)[:10]}{' ...' if len(by_index) > 10 else ''}"
        )
    names = [by_index[i] for i in range(count)]
    if not all(isinstance(name, str) for name in names):
        raise ConfigError(f"labels file {path} must hold {_JSON_FORMS}")
    return names
