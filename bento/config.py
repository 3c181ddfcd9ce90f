"""One typed settings object for the whole product (env prefix ``RIS_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ModelChoice = Literal["auto", "resnet50", "efficientnet-lite0"]
RuntimeName = Literal["auto", "torch", "openvino"]
PrecisionChoice = Literal["auto", "fp32", "fp16", "bf16", "int8"]
IndexType = Literal["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"]


class Settings(BaseSettings):
    """Every knob of the service, the ingest job and the model import.

    Read from the environment (``RIS_MILVUS_URI=...``) or a ``.env`` file. Nested values use ``__``.
    """

    model_config = SettingsConfigDict(
        env_prefix="RIS_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    data_dir: Path = Field(Path("data"), description="Root for the embedded defaults (Milvus Lite file, images).")

    # --- model -----------------------------------------------------------------------------------
    model: ModelChoice = Field("auto", description="Backbone: auto, resnet50 or efficientnet-lite0.")
    resnet50_weights: str = Field(
        "IMAGENET1K_V2",
        description="ResNet-50 weights: a torchvision weights name, a local .pth path, or 'random' (tests only).",
    )
    weights_download_timeout_s: float = Field(
        5.0, gt=0, description="How long `auto` waits for the weights host before falling back."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the embedder runs.")
    embedder_gpus: int = Field(-1, ge=-1, description="GPUs BentoML assigns to the embedder (-1: 1 if nvidia-smi exists).")
    runtime: RuntimeName = Field(
        "auto", description="Inference runtime: auto (CUDA: torch; CPU: openvino), torch (eager reference) or openvino."
    )
    precision: PrecisionChoice = Field(
        "auto", description="auto (CUDA: fp16; OpenVINO: bf16 where the CPU and model allow, else fp32), fp32, fp16, bf16 or int8."
    )
    runtime_cache_dir: Path | None = Field(
        None,
        description="Converted OpenVINO models reused across restarts (cold start); empty: $BENTOML_HOME/ris-runtime-cache.",
    )
    int8_calibration_dir: Path | None = Field(
        None, description="Folder of typical photos that calibrates RIS_PRECISION=int8 (up to 128 are sampled)."
    )

    # --- adaptive batching (see README: measured batch-size/latency curve) ---------------------------
    embed_batching: bool = Field(True, description="Adaptive batching of embed calls (false: one model call per request).")
    embed_max_batch_size: int = Field(32, ge=2, le=512, description="Largest batch the embedder forms.")
    embed_max_latency_ms: int = Field(
        3000, ge=50, description="Latency budget per request; BentoML sheds (503) what it predicts would exceed it."
    )

    # --- service composition ------------------------------------------------------------------------
    api_workers: int = Field(1, ge=1, description="Processes of the HTTP API service (decoding runs there).")
    embedder_url: str = Field("", description="Use a separately deployed embedder at this URL instead of a local one.")
    vector_search_url: str = Field("", description="Use a separately deployed vector-search service at this URL.")

    # --- Milvus ----------------------------------------------------------------------------------
    milvus_uri: str = Field("", description="Milvus URI; empty means the Milvus Lite file <data_dir>/milvus.db.")
    milvus_token: str = Field("", description="Milvus token ('user:password' or API key).")
    milvus_db_name: str = Field("", description="Milvus database (server only).")
    collection: str = Field("images", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="Milvus collection name.")
    index_type: IndexType = Field("HNSW", description="Vector index built for a new collection.")
    index_params: dict[str, int] = Field(default_factory=dict, description="Overrides of the index build parameters.")

    search_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] = Field(
        "Session",
        description="Milvus consistency of searches (Session: this service's own writes are always seen).",
    )
    milvus_timeout_s: float = Field(10.0, gt=0, description="Timeout of one Milvus call; past it the API answers 503.")

    # --- image store -------------------------------------------------------------------------------
    store_backend: Literal["local", "s3"] = Field("local", description="Image store: a local directory or MinIO/S3.")
    store_dir: Path | None = Field(None, description="Local image store; empty means <data_dir>/images.")
    s3_endpoint: str = Field("", description="MinIO/S3 endpoint as host:port (no scheme).")
    s3_public_endpoint: str = Field(
        "",
        description="Where browsers reach S3, as a URL without a path (https://images.example.com): "
        "presigned URLs are signed for this host. Empty: signed for s3_endpoint.",
    )
    s3_bucket: str = Field("images", description="Bucket (created if missing, always private).")
    s3_access_key: SecretStr = Field(SecretStr(""), description="S3 access key.")
    s3_secret_key: SecretStr = Field(SecretStr(""), description="S3 secret key.")
    s3_secure: bool = Field(True, description="Use HTTPS to reach the S3 endpoint.")
    s3_region: str = Field("us-east-1", description="S3 region (also lets URLs be signed without a network call).")
    s3_prefix: str = Field("", description="Key prefix inside the bucket (several deployments can share one).")
    s3_timeout_s: float = Field(5.0, gt=0, description="Connect/read timeout of one S3 call.")
    presign_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned image URLs.")
    thumbnail_size: int = Field(256, ge=32, le=1024, description="Longest side of stored thumbnails (px).")

    # --- request limits ----------------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest accepted image file.")
    max_image_pixels: int = Field(50_000_000, ge=10_000, description="Largest accepted width x height (bomb guard).")
    decode_draft_scale: float = Field(
        2.0,
        ge=0,
        description="Decode large JPEGs at a reduced scale, keeping >= this x the model's resize size (0: full decode).",
    )
    url_fetch_timeout_s: float = Field(10.0, gt=0, description="Timeout for search-by-URL downloads.")
    default_top_k: int = Field(12, ge=1, description="Hits returned when a request names no top_k.")
    max_top_k: int = Field(200, ge=1, le=16384, description="Largest top_k a request may ask for.")

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        if self.store_backend == "s3" and not self.s3_endpoint:
            raise ValueError("RIS_STORE_BACKEND=s3 needs RIS_S3_ENDPOINT (host:port).")
        if self.s3_public_endpoint:
            url = urlsplit(self.s3_public_endpoint)
            try:
                url.port  # noqa: B018 (raises ValueError on a bad port)
                well_formed = url.scheme in ("http", "https") and bool(url.hostname)
            except ValueError:
                well_formed = False
            if not well_formed or url.path.strip("/") or url.query or url.fragment or url.username:
                raise ValueError(
                    "RIS_S3_PUBLIC_ENDPOINT is a scheme and a host (and port) only, like https://images.example.com, "
                    f"not {self.s3_public_endpoint!r}: the bucket and key are added to it."
                )
            self.s3_public_endpoint = f"{url.scheme}://{url.netloc}"
        if self.store_dir is None:
            self.store_dir = self.data_dir / "images"
        if not self.milvus_uri:
            self.milvus_uri = str(self.data_dir / "milvus.db")
        return self

    @property
    def milvus_is_lite(self) -> bool:
        """A Milvus Lite file is any URI that is not a network address."""
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "unix:"))

    @property
    def milvus_backend(self) -> str:
        return "milvus-lite" if self.milvus_is_lite else "milvus-server"

    @property
    def image_store_dir(self) -> Path:
        assert self.store_dir is not None  # filled by the validator
        return self.store_dir


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
