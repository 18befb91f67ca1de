"""Response shapes of the JSON API (they document it at /docs and /openapi.json)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    class_: int = Field(alias="class", description="Class index.")
    label: str
    prob: float = Field(description="Softmax probability.")


class ClassMap(BaseModel):
    class_: int = Field(alias="class", description="The explained class.")
    label: str
    score: float = Field(description="The class's logit.")
    prob: float
    box: list[int] | None = Field(
        description="Zhou's box [x0, y0, x1, y1] (exclusive x1, y1) in original-image pixels; "
        "null when the map has no positive value."
    )
    display_box: list[int] | None = Field(description="The same box at display size.")
    overlay: str = Field(
        description="PNG data URL: the photo at display size, the heat map blended in with "
        "the requested colormap and alpha, the box outlined in white."
    )
    heatmap: str = Field(
        description="PNG data URL, 8-bit gray at display size: min(255, floor(256 * map)), "
        "a row of the 256-colour tables of /api/colormaps."
    )


class DenseObject(BaseModel):
    """A detection or a class region of a detector's or segmenter's image, with its map."""

    index: int = Field(description="Its position in ``objects`` (0 .. K-1).")
    class_: int = Field(alias="class", description="Its class.")
    label: str
    score: float = Field(
        description="Detection: the detector's score. Segmentation: the class's logits "
        "summed over the region."
    )
    box: list[int] | None = Field(
        default=None,
        description="Detection: its box [x0, y0, x1, y1] (exclusive x1, y1) in "
        "original-image pixels.",
    )
    display_box: list[int] | None = Field(
        default=None, description="Detection: the same box at display size."
    )
    pixels: int | None = Field(
        default=None, description="Segmentation: the region's size at the model's input."
    )
    fraction: float | None = Field(
        default=None, description="Segmentation: the region's share of the image."
    )
    mean_prob: float | None = Field(
        default=None, description="Segmentation: the class's mean probability in the region."
    )
    region: str | None = Field(
        default=None, description='Segmentation: "predicted" (the pixels of this class).'
    )
    mask: str | None = Field(
        default=None,
        description="Segmentation: PNG data URL, 8-bit gray at display size, 255 inside the "
        "region.",
    )
    overlay: str = Field(
        description="PNG data URL: the photo at display size with the map blended in, the "
        "detection's box or the region's outline drawn in white."
    )
    heatmap: str = Field(
        description="PNG data URL, 8-bit gray at display size, as a class map's heatmap."
    )


class Display(BaseModel):
    size: list[int] = Field(description="[width, height] of the pictures in this response.")
    image: str = Field(description="The photo at display size, PNG data URL.")


class ExplainResponse(BaseModel):
    model: str
    method: str
    layer: str = Field(description="The feature layer the maps come from.")
    identity_error: float | None = Field(
        description="CAM only: max |mean(M_c) + b_c - y_c|, the check that the map decomposes "
        "the score exactly."
    )
    method_options: dict[str, bool | int] = Field(
        default_factory=dict,
        description="Settings the server applied to the method, e.g. max_channels: Score-CAM "
        "and Ablation-CAM perturb only the channels with the highest mean activation.",
    )
    size: list[int] = Field(description="[width, height] of the original image.")
    display: Display
    colormap: str
    alpha: float
    predictions: list[Prediction] = Field(
        description="The five most likely classes (empty for a detector or segmenter)."
    )
    maps: list[ClassMap] = Field(
        description="One per explained class (empty for a detector or segmenter)."
    )
    task: str = Field(
        default="classification",
        description='"classification", "detection" or "segmentation": the model\'s task.',
    )
    objects: list[DenseObject] = Field(
        default_factory=list,
        description="Detector or segmenter: one per detection scoring at least "
        "score_threshold, or per predicted class but the background, with its map.",
    )


class ModelsResponse(BaseModel):
    models: list[str]
    default_model: str
    methods: list[str] = Field(
        description="The methods that can explain the default model (the attention methods "
        "only for a transformer)."
    )
    default_method: str
    colormaps: list[str]
    samples: list[str]
    max_upload_mb: float
    max_topk: int
    default_task: str = Field(
        default="classification",
        description="The default model's task; for a detector or segmenter, ``methods`` "
        "leaves CAM out.",
    )
    tasks: dict[str, str] = Field(
        default_factory=dict, description="The tasks of the models loaded so far, by name."
    )


class LabelsResponse(BaseModel):
    model: str
    labels: list[str]


class QueueStats(BaseModel):
    active: int = Field(description="Admitted requests: uploading, waiting or running.")
    capacity: int = Field(description="Most requests admitted at once; more get 503.")
    finished: int = Field(description="Jobs finished since the start.")


class Health(BaseModel):
    status: str
    models_loaded: list[str]
    queue: QueueStats


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong, and what to do.")
