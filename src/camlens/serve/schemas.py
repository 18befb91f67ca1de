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
    predictions: list[Prediction] = Field(description="The five most likely classes.")
    maps: list[ClassMap] = Field(description="One per explained class.")


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
