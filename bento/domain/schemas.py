"""Typed boundaries: what crosses HTTP, service-to-service calls and the ingest job."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer, TypeAdapter

from bento.core.config import IndexType, VerdictSettings
from bento.core.errors import ErrorPayload, SearchError
from bento.core.ids import IMAGE_ID_PATTERN
from models.info import CopyModel, ModelDescription, ModelInfo  # noqa: F401 (the API shows them: re-exported)

MAX_LABEL_LENGTH = 256


def _unix_seconds(value: Any) -> Any:
    """A time as Unix seconds: the number itself, or an ISO 8601 string (what the JSON form carries)."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return value  # not ISO 8601: the number check says what is wrong
    return value


def _iso_8601(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# Points in time. Inside the product (Milvus rows, the listing's arrays) they are Unix seconds; every JSON
# answer carries them as ISO 8601 in UTC ("2026-12-07T15:50:56Z"), the one form of a time on the wire.
# (Durations are numbers with their unit in the name: ``*_ms``.)
UnixTime = Annotated[int, BeforeValidator(_unix_seconds), PlainSerializer(_iso_8601, return_type=datetime, when_used="json")]
PreciseUnixTime = Annotated[
    float, BeforeValidator(_unix_seconds), PlainSerializer(_iso_8601, return_type=datetime, when_used="json")
]


class Health(BaseModel):
    """A dependency's answer to "can you serve?" (never an exception: /api/status shows it)."""

    ok: bool
    error: ErrorPayload | None = None


class Reply(BaseModel):
    """What a service-to-service call returns: a value, or the domain error it raised as data.

    BentoML turns an exception raised by a service into an HTTP error whose 5xx text it replaces with a
    generic message; as a reply, the error reaches the caller whole and is raised there as the same class
    (``unwrap``), so e.g. the advice of a locked Milvus Lite file reaches the HTTP client."""

    value: Any = None
    error: ErrorPayload | None = None

    @classmethod
    def of(cls, value: Any) -> Reply:
        return cls(value=value.model_dump() if isinstance(value, BaseModel) else value)

    @classmethod
    def failed(cls, error: SearchError) -> Reply:
        return cls(error=error.to_payload())

    def unwrap(self, kind: Any) -> Any:
        """The value validated as ``kind`` (a type or a type expression), or the error raised."""
        if self.error is not None:
            raise self.error.to_exception()
        return TypeAdapter(kind).validate_python(self.value)


class IndexSpec(BaseModel):
    index_type: IndexType = "HNSW"
    params: dict[str, int] = Field(default_factory=dict)


class ImageMetadata(BaseModel):
    """What the collection keeps beside each vector (no second database needed)."""

    id: str = Field(pattern=IMAGE_ID_PATTERN)
    label: str = Field("", max_length=MAX_LABEL_LENGTH)
    mime: str
    width: int
    height: int
    size_bytes: int
    source: str = Field("", description="Where the image came from (file name or URL); informational only.")
    created_at: UnixTime = Field(description="When it was added (ISO 8601, UTC).")


class VectorRecord(ImageMetadata):
    pixel_hash: str = Field("", max_length=32, description="Digest of the decoded pixels: the exact-duplicate key.")
    vector: list[float] = Field(description="The main view's vector (what queries are compared with).")
    views: list[list[float]] = Field(default_factory=list, description="One vector per extra view of the recipe.")


class VectorQuery(BaseModel):
    vector: list[float]
    top_k: int = Field(ge=1)
    offset: int = Field(0, ge=0)
    label: str | None = None
    min_score: float | None = None
    views: list[int] | None = Field(None, description="The stored views to compare with (0 = main); None: all.")
    margins: dict[int, float] = Field(
        default_factory=dict, description="Subtracted from the score of a match through these views (view -> margin)."
    )
    extra_vectors: list[list[float]] = Field(
        default_factory=list,
        max_length=4,
        description="The query embedded otherwise (at a low-res view's input side), searched like `vector`; each image keeps its best.",
    )


Verdict = Literal["same-image", "near-duplicate", "similar", "unrelated"]
# Which question a hit answers: "copy" (the copy model found the picture itself or an edited copy of it)
# or "similar" (the similarity model found something that looks like it).
Match = Literal["copy", "similar"]
SearchMode = Literal["both", "copies", "similar"]


class Thresholds(BaseModel):
    """Scores from which a hit is called the same image / a near duplicate / similar (python -m ingest.evaluate
    measures the score distributions they come from). ``same_image`` and ``near_duplicate`` are copy-model
    scores where a copy model serves (``copy_model``), else similarity scores."""

    same_image: float | None
    near_duplicate: float | None
    similar: float | None = None
    copy_model: bool = False

    @classmethod
    def resolve(cls, verdict: VerdictSettings, similarity: ModelInfo, copy: ModelInfo | None = None) -> Thresholds:
        """The one threshold rule: the settings' (RIS_VERDICT_*) where set, else those measured for the models.
        Same image and near duplicate are the copy model's scores where one serves, else the similarity
        model's; the floor of `similar` is always the similarity model's."""
        measured = copy or similarity
        return cls(
            same_image=verdict.same_image if verdict.same_image is not None else measured.same_image_score,
            near_duplicate=verdict.near_duplicate if verdict.near_duplicate is not None else measured.near_duplicate_score,
            similar=verdict.similar if verdict.similar is not None else similarity.similar_score,
            copy_model=copy is not None,
        )

    def verdict(self, score: float) -> Verdict | None:
        """The verdict of a similarity score where no copy model serves."""
        if self.same_image is None or self.near_duplicate is None:
            return None
        if score >= self.same_image:
            return "same-image"
        return "near-duplicate" if score >= self.near_duplicate else self.similar_verdict(score)

    def copy_verdict(self, score: float) -> Verdict | None:
        """A copy-model score: the same image, a near duplicate, or None (not a copy)."""
        if self.same_image is not None and score >= self.same_image:
            return "same-image"
        if self.near_duplicate is not None and score >= self.near_duplicate:
            return "near-duplicate"
        return None

    def similar_verdict(self, score: float) -> Verdict:
        return "unrelated" if self.similar is not None and score < self.similar else "similar"


class VectorHit(BaseModel):
    score: float
    image: ImageMetadata
    verdict: Verdict | None = None  # None where no threshold is known for the model
    match: Match | None = None


class IndexInfo(BaseModel):
    collection: str
    image_count: int
    model: ModelInfo
    index: IndexSpec
    metric: str
    milvus_backend: str
    milvus_uri: str
    loaded: bool
    embedding_runtimes: list[str] = Field(
        default_factory=list, description="Runtime-precision pairs that have embedded into this collection."
    )


# --- HTTP API ------------------------------------------------------------------------------------


class SearchOptions(BaseModel):
    mode: SearchMode = Field(
        "both",
        description="`both`: copies and edits of the picture first (copy model), then similar images (similarity "
        "model), each image once; `copies` or `similar`: one of the two lists.",
    )
    top_k: int | None = Field(None, ge=1, description="Number of hits (default from settings).")
    offset: int = Field(0, ge=0, description="Skip this many hits (paging).")
    label: str | None = Field(None, max_length=MAX_LABEL_LENGTH, description="Only images with this label.")
    min_score: float | None = Field(None, ge=-1, le=1, description="Only hits scoring at least this (cosine similarity).")


class SearchByUrl(SearchOptions):
    url: str = Field(description="http(s) URL of an image.")


class SearchById(SearchOptions):
    id: str = Field(pattern=IMAGE_ID_PATTERN)


class ImageCard(BaseModel):
    """An image as the API shows it: its metadata and where to get its bytes."""

    id: str
    label: str
    image_url: str
    thumbnail_url: str
    width: int
    height: int
    mime: str
    size_bytes: int
    source: str
    created_at: UnixTime = Field(description="When it was added (ISO 8601, UTC).")


class SearchHit(ImageCard):
    score: float = Field(description="Cosine similarity in [-1, 1] of the model that found it (`match`); 1 is identical.")
    verdict: Verdict | None = Field(
        None,
        description="same-image / near-duplicate (copies) or similar / unrelated by the thresholds in /api/status "
        "(null: none known for this model).",
    )
    match: Match | None = Field(
        None, description="`copy`: found by the copy model (the picture or an edited copy of it); `similar`: by the similarity model."
    )


class GalleryPage(BaseModel):
    """A page of the collection, newest first (``state`` "scanning" while its listing is first read)."""

    state: Literal["ready", "scanning"]
    total: int = Field(description="Images in the collection (with the label, when one is given).")
    offset: int
    limit: int
    label: str | None
    images: list[ImageCard]
    as_of: PreciseUnixTime | None = Field(
        None, description="When the listing behind this page was read (ISO 8601, UTC; writes through this service show at once)."
    )
    has_more: bool = Field(False, description="Whether a next page exists.")
    next_offset: int | None = Field(None, description="The `offset` of the next page (null: this is the last one).")


class Timings(BaseModel):
    decode_ms: float = 0.0
    embed_ms: float = 0.0
    search_ms: float = 0.0
    total_ms: float = 0.0


class SearchResponse(BaseModel):
    query_id: str | None = Field(None, description="Content hash of the query image.")
    mode: SearchMode = "both"
    hits: list[SearchHit]
    top_k: int
    offset: int
    label: str | None
    min_score: float | None = None
    model: str
    copy_model: str | None = Field(None, description="The copy model's id (null: none serves).")
    timings: Timings
    has_more: bool = Field(False, description="Whether a next page exists.")
    next_offset: int | None = Field(None, description="The `offset` of the next page (null: this is the last one).")


class InsertResponse(BaseModel):
    id: str
    created: bool
    message: str
    image: ImageMetadata


class DeleteResponse(BaseModel):
    id: str
    deleted: bool


class Limits(BaseModel):
    """What one request may ask (shown by /api/status)."""

    max_upload_bytes: int
    max_image_pixels: int
    max_top_k: int
    default_top_k: int
    embed_max_batch_size: int
    embed_max_latency_ms: int


class StoreInfo(BaseModel):
    backend: str
    location: str | None = Field(None, description="Where the store is (admin keys only).")


class StatusResponse(BaseModel):
    ready: bool
    image_count: int = Field(description="Images in the collection (-1: Milvus cannot say now).")
    model: ModelInfo
    device: str
    copy_model: ModelInfo | None = Field(None, description="The copy-detection model (null: RIS_MODEL_COPY_NAME=none).")
    copy_device: str | None = None
    index: IndexSpec
    metric: str
    collection: str
    milvus_backend: str
    milvus_uri: str | None = Field(None, description="The Milvus URI (admin keys only).")
    store: StoreInfo
    limits: Limits
    thresholds: Thresholds = Field(description="The scores from which hits are called same-image / near-duplicate.")
    error: str = Field("", description="Why Milvus or the image store is not ready, when one is not.")
    scopes: list[str] = Field(default_factory=list, description="What the caller may do (search, write, admin).")
    keys: bool = Field(False, description="Whether the service has API keys (else writes are open to localhost only).")


class FieldError(BaseModel):
    location: str = Field(description="Where the field is: `query`, `body` (JSON or form), `path` or `header`.")
    field: str = Field(description="The field's name (`top_k`; nested: `a.b`).")
    message: str


class ErrorResponse(BaseModel):
    """Every error answer: a stable code, a sentence for people, and for a 422 which fields are wrong."""

    error: str = Field(description="A stable code (`validation_error`, `not_found`, `rate_limited`, ...).")
    detail: str
    errors: list[FieldError] | None = Field(None, description="422 only: one entry per invalid or unknown field.")


def next_page(offset: int, size: int, more: bool) -> dict[str, Any]:
    """The paging fields of a page of ``size`` items at ``offset``: ``{"has_more", "next_offset"}``."""
    return {"has_more": more, "next_offset": offset + size if more else None}
