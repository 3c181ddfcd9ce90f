"""What a model tells its callers about itself: the facts that decide whether two embeddings may be
compared, and the preprocessing recipe callers prepare pixels with."""

from __future__ import annotations

from pydantic import BaseModel, Field

from models.preprocess import Preprocessing


class ModelInfo(BaseModel):
    """Which embedding model serves, and the facts that decide whether two embeddings may be compared."""

    backbone: str
    model_id: str = Field(description="backbone@weights-digest: embeddings with different ids never mix.")
    dim: int
    preprocessing: str = Field(description="Version string of the decode/resize/crop/normalise recipe.")
    vectors_per_image: int = Field(1, ge=1, description="Vectors stored per image: the main view and the extra views.")
    same_image_score: float | None = Field(None, description="Measured score from which a hit is the same image.")
    near_duplicate_score: float | None = Field(None, description="Measured score from which a hit is a near duplicate.")
    similar_score: float | None = Field(None, description="Measured score below which a hit is unrelated (similarity models).")
    weights: str = Field(description="Where the weights came from.")
    pretrained: bool
    reason: str = Field("", description="Why this backbone was chosen (for `auto`).")
    store_tag: str = Field("", description="BentoML model-store tag the weights were loaded from.")
    runtime: str = Field("", description="Inference runtime that computes the embeddings (torch, openvino).")
    precision: str = Field("", description="Numeric precision of that runtime (fp32, fp16, bf16, int8).")


class ModelDescription(BaseModel):
    """What the embedder tells its callers: the model, its preprocessing recipe (callers prepare pixels with
    it), and where it runs."""

    info: ModelInfo
    preprocessing: Preprocessing
    device: str


class CopyModel(BaseModel):
    """The embedder's answer to "which copy model serves?" (``description`` None: none)."""

    description: ModelDescription | None = None
