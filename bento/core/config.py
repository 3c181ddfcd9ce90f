"""One typed settings object for the whole product, read from ``RIS_*`` environment variables.

Settings come in groups, one environment prefix each: ``RIS_MODEL_*`` (which model, on which runtime),
``RIS_BATCHING_*``, ``RIS_SERVICES_*`` (how the BentoML services are composed), ``RIS_MILVUS_*``,
``RIS_STORE_*`` and ``RIS_S3_*`` (the image store), ``RIS_LIMITS_*`` (what one request may ask),
``RIS_AUTH_*`` (API keys), ``RIS_FETCH_*`` (search by URL), plus ``RIS_DATA_DIR``. An unknown ``RIS_*`` variable is refused at start, so a typo never silently falls
back to a default (and a renamed setting says what it is called now).

The settings table (docs/settings.md) is generated from this module (``python -m bento.core.config``); a test keeps
the two equal.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "RIS_"
RuntimeName = Literal["auto", "torch", "openvino"]
PrecisionChoice = Literal["auto", "fp32", "fp16", "bf16", "int8"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
IndexType = Literal["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"]

# The names the model settings accept. Settings are the bottom layer and do not import the model registry
# (models/); tests/test_layout.py checks that these lists and the registry (models.backbones.model_choices,
# models.preprocess.VIEW_SETS, in their order) agree.
SIMILARITY_MODELS = ("auto", "resnet50", "efficientnet-lite0")
COPY_MODELS = ("auto", "sscd-resnet50", "sscd-distilled", "sscd-int8", "none")
VIEW_SET_NAMES = ("low-res-64", "crops-60")

# Settings that were renamed or folded into others when the settings were grouped: refused with advice.
RENAMED: dict[str, str] = {
    "RIS_MODEL": "RIS_MODEL_NAME",
    "RIS_RESNET50_WEIGHTS": "RIS_MODEL_RESNET50_WEIGHTS",
    "RIS_DEVICE": "RIS_MODEL_DEVICE",
    "RIS_RUNTIME": "RIS_MODEL_RUNTIME",
    "RIS_PRECISION": "RIS_MODEL_PRECISION",
    "RIS_RUNTIME_CACHE_DIR": "RIS_MODEL_RUNTIME_CACHE_DIR",
    "RIS_INT8_CALIBRATION_DIR": "RIS_MODEL_INT8_CALIBRATION_DIR",
    "RIS_EMBEDDER_GPUS": "RIS_MODEL_DEVICE (cuda: the embedder asks BentoML for one GPU)",
    "RIS_EMBED_BATCHING": "RIS_BATCHING_MAX_BATCH_SIZE (1 switches batching off)",
    "RIS_EMBED_MAX_BATCH_SIZE": "RIS_BATCHING_MAX_BATCH_SIZE",
    "RIS_EMBED_MAX_LATENCY_MS": "RIS_BATCHING_MAX_LATENCY_MS",
    "RIS_API_WORKERS": "RIS_SERVICES_API_WORKERS",
    "RIS_EMBEDDER_URL": "RIS_SERVICES_EMBEDDER_URL",
    "RIS_VECTOR_SEARCH_URL": "RIS_SERVICES_VECTOR_SEARCH_URL",
    "RIS_COLLECTION": "RIS_MILVUS_COLLECTION",
    "RIS_INDEX_TYPE": "RIS_MILVUS_INDEX_TYPE",
    "RIS_INDEX_PARAMS": "RIS_MILVUS_INDEX_PARAMS",
    "RIS_SEARCH_CONSISTENCY": "RIS_MILVUS_SEARCH_CONSISTENCY",
    "RIS_THUMBNAIL_SIZE": "RIS_STORE_THUMBNAIL_SIZE",
    "RIS_PRESIGN_EXPIRY_S": "RIS_S3_PRESIGN_EXPIRY_S",
    "RIS_MAX_UPLOAD_BYTES": "RIS_LIMITS_MAX_UPLOAD_BYTES",
    "RIS_MAX_IMAGE_PIXELS": "RIS_LIMITS_MAX_IMAGE_PIXELS",
    "RIS_URL_FETCH_TIMEOUT_S": "RIS_FETCH_TIMEOUT_S",
    "RIS_LIMITS_URL_FETCH_TIMEOUT_S": "RIS_FETCH_TIMEOUT_S",
    "RIS_DEFAULT_TOP_K": "RIS_LIMITS_DEFAULT_TOP_K",
    "RIS_MAX_TOP_K": "RIS_LIMITS_MAX_TOP_K",
    "RIS_WEIGHTS_DOWNLOAD_TIMEOUT_S": "nothing: a measured constant now (models/backbones.py)",
    "RIS_DECODE_DRAFT_SCALE": "nothing: a measured constant now (models/pipeline.py)",
}


class ModelSettings(BaseModel):
    """Which embedding model serves, and how it runs."""

    name: str = Field(
        "auto", description="Backbone: `auto` (the best one available), `resnet50` or `efficientnet-lite0`."
    )
    resnet50_weights: str = Field(
        "IMAGENET1K_V2",
        description="ResNet-50 weights: a torchvision weights name, a local `.pth` path, or `random` (tests only).",
    )
    device: DeviceChoice = Field(
        "auto", description="`auto` (CUDA when a GPU is visible), `cpu` or `cuda`; with a GPU the embedder asks BentoML for one."
    )
    runtime: RuntimeName = Field(
        "auto", description="Inference runtime: `auto` (CUDA: `torch`; CPU: `openvino`), `torch` (eager, the fp32 reference), `openvino`."
    )
    precision: PrecisionChoice = Field(
        "auto",
        description="`auto` (CUDA: fp16; OpenVINO: bf16 where the CPU and the model allow, else fp32), `fp32`, `fp16`, `bf16`, `int8`.",
    )
    int8_calibration_dir: Path | None = Field(
        None, description="Folder of typical photos that calibrates `precision=int8` (up to 128 sampled)."
    )
    runtime_cache_dir: Path | None = Field(
        None, description="Converted OpenVINO models reused across restarts; empty: `$BENTOML_HOME/ris-runtime-cache`."
    )

    views: str = Field(
        "auto",
        description="Extra vectors stored per image, comma-separated: `low-res-64` (finds thumbnails), `crops-60` "
        "(finds crops; 5 vectors), empty, or `auto`: `low-res-64` where no copy model serves, none where one does (it "
        "finds thumbnails itself, `RIS_MODEL_COPY_RECHECK_SIDE`). Changing it needs `python -m ingest.reembed`.",
    )

    copy_name: str = Field(
        "auto",
        description="Copy-detection model (finds the original and edited copies): `auto` (GPU: Meta's SSCD ResNet-50; CPU: "
        "the packaged `sscd-distilled`), `sscd-resnet50`, `sscd-distilled`, `sscd-int8`, or `none`.",
    )
    sscd_weights: str = Field(
        "disc_mixup",
        description="Meta's SSCD weights: `disc_mixup` (downloaded from Meta), a local `.torchvision.pt`/`.torchscript.pt` path, or `random` (tests only).",
    )
    copy_views: str = Field(
        "",
        description="Extra copy vectors stored per image: `crops-60` (the source outranks its own crops; 5 vectors) or empty. "
        "Changing it needs `python -m ingest.reembed`.",
    )
    copy_recheck_side: int = Field(
        128,
        ge=0,
        le=1024,
        description="A query whose longer side is at most this many px: its best copy candidates are also compared with "
        "it at its own size, from their stored thumbnails (a 64-px thumbnail finds its original as a copy); 0: never. "
        "Capped at the thumbnail size.",
    )

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name not in SIMILARITY_MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SIMILARITY_MODELS)}")
        return name

    @field_validator("copy_name")
    @classmethod
    def _known_copy_model(cls, name: str) -> str:
        if name not in COPY_MODELS:
            raise ValueError(f"unknown copy model {name!r}; choose one of {', '.join(COPY_MODELS)}")
        return name

    @property
    def copy_view_sets(self) -> tuple[str, ...]:
        return tuple(name for name in self.copy_views.split(",") if name)

    @field_validator("views", "copy_views")
    @classmethod
    def _known_views(cls, views: str, info: ValidationInfo) -> str:
        if info.field_name == "views" and views.strip() == "auto":
            return "auto"
        names = [name.strip() for name in views.split(",") if name.strip()]
        unknown = [name for name in names if name not in VIEW_SET_NAMES]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"views {views!r}: each of {', '.join(VIEW_SET_NAMES)} at most once, comma-separated")
        return ",".join(name for name in VIEW_SET_NAMES if name in names)  # one spelling per recipe

    @property
    def view_sets(self) -> tuple[str, ...]:
        """The similarity model's views. ``auto``: the low-res view only where no copy model serves. With one, a
        small query's copy candidates are re-checked at its size, which finds 64-px thumbnails as copies (with
        siblings stored: 1.00 first, true scores p5 0.87) for no stored vector (docs/models.md)."""
        if self.views == "auto":
            return ("low-res-64",) if self.copy_name == "none" else ()
        return tuple(name for name in self.views.split(",") if name)


class BatchingSettings(BaseModel):
    """Adaptive batching of the embedder (docs/performance.md: "Adaptive batching" has the measured curve)."""

    max_batch_size: int = Field(32, ge=1, le=512, description="Largest batch the embedder forms; `1` switches batching off.")
    max_latency_ms: int = Field(
        3000, ge=50, description="Latency budget per request; BentoML sheds (503) what it predicts would exceed it."
    )

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


class ServicesSettings(BaseModel):
    """How the three BentoML services are composed."""

    api_workers: int = Field(1, ge=1, description="Processes of the HTTP API service (decoding runs there).")
    embedder_url: str = Field("", description="A separately deployed embedder at this URL instead of a local one.")
    vector_search_url: str = Field("", description="A separately deployed vector-search service at this URL.")


class MilvusSettings(BaseModel):
    uri: str = Field("", description="Milvus URI; empty: the Milvus Lite file `<data_dir>/milvus.db`.")
    token: SecretStr = Field(SecretStr(""), description="Milvus token (`user:password` or API key; a secret).")
    db_name: str = Field("", description="Milvus database (server only).")
    collection: str = Field("images", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="Collection name.")
    index_type: IndexType = Field("HNSW", description="Vector index built for a new collection.")
    index_params: dict[str, int] = Field(
        default_factory=dict, description='Overrides of the index build parameters (JSON, e.g. `{"M": 32}`).'
    )
    search_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] = Field(
        "Session",
        description="Consistency of searches: `Session` (this service's own writes are always seen), `Strong` (waits for the server's next time tick: slower, docs/deployment.md), `Bounded`, `Eventually`.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Timeout of one Milvus call; past it the API answers 503.")

    @property
    def is_lite(self) -> bool:
        """A Milvus Lite file is any URI that is not a network address."""
        return not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))

    @property
    def backend(self) -> str:
        return "milvus-lite" if self.is_lite else "milvus-server"


class StoreSettings(BaseModel):
    backend: Literal["local", "s3"] = Field("local", description="Image store: a `local` directory or `s3` (MinIO/S3, see `RIS_S3_*`).")
    dir: Path | None = Field(None, description="Local image store; empty: `<data_dir>/images`.")
    thumbnail_size: int = Field(256, ge=32, le=1024, description="Longest side of stored thumbnails (px).")
    serve_location: bool = Field(
        False, description="Serve originals with their EXIF GPS location (default: removed when served)."
    )


class S3Settings(BaseModel):
    endpoint: str = Field("", description="MinIO/S3 endpoint as `host:port` (no scheme); required with `s3`.")
    public_endpoint: str = Field(
        "",
        description="Where browsers reach the same S3 server, a URL with scheme and host only (`https://images.example.com`): presigned URLs are signed for it (offline). Empty: signed for the endpoint.",
    )
    bucket: str = Field("images", description="Bucket (created if missing, always private).")
    access_key: SecretStr = Field(SecretStr(""), description="S3 access key (a secret: never logged or shown).")
    secret_key: SecretStr = Field(SecretStr(""), description="S3 secret key (a secret).")
    secure: bool = Field(True, description="Use HTTPS to reach the endpoint.")
    region: str = Field("us-east-1", description="S3 region (also lets URLs be signed without a network call).")
    prefix: str = Field("", description="Key prefix inside the bucket (several deployments can share one).")
    timeout_s: float = Field(5.0, gt=0, description="Connect/read timeout of one S3 call.")
    presign_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned image URLs.")

    @field_validator("public_endpoint")
    @classmethod
    def _scheme_and_host_only(cls, value: str) -> str:
        if not value:
            return value
        url = urlsplit(value)
        try:
            url.port  # noqa: B018 (raises ValueError on a bad port)
            well_formed = url.scheme in ("http", "https") and bool(url.hostname)
        except ValueError:
            well_formed = False
        if not well_formed or url.path.strip("/") or url.query or url.fragment or url.username:
            raise ValueError(
                "RIS_S3_PUBLIC_ENDPOINT is a scheme and a host (and port) only, like https://images.example.com, "
                f"not {value!r}: the bucket and key are added to it."
            )
        return f"{url.scheme}://{url.netloc}"


class AuthSettings(BaseModel):
    """API keys (docs/security.md). Only hashes are configured; keys are shown once when made."""

    keys: str = Field(
        "",
        description="API keys as `name:scope:sha256hex` entries (comma-separated; scope `search`, `write` or `admin`); make one with `python -m bento.http.auth new`.",
    )
    keys_file: Path | None = Field(None, description="A file (e.g. a mounted Secret) with more entries, one per line.")
    anonymous_scopes: str = Field(
        "search", description="What requests without a key may do (`search`, or empty for nothing); with no keys at all, a loopback-bound service is fully open."
    )
    client_key: SecretStr = Field(SecretStr(""), description="The key `python -m ingest --service-url` sends (a secret).")


class FetchSettings(BaseModel):
    """Search by URL: what the service may fetch (docs/security.md)."""

    timeout_s: float = Field(10.0, gt=0, le=120, description="Deadline of one whole fetch (connect, redirects, body).")
    allow: str = Field(
        "",
        description="Comma-separated `host`, `host:port`, CIDR or `CIDR:port` entries that may be fetched although private (an intranet); empty: public addresses, ports 80/443 only.",
    )
    max_concurrent: int = Field(8, ge=1, le=256, description="Fetches in flight at once per API worker; more are answered 503 with Retry-After at once (never queued).")


class LimitsSettings(BaseModel):
    """What one request may ask of the service."""

    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest accepted image file.")
    max_image_pixels: int = Field(50_000_000, ge=10_000, description="Largest accepted width x height (bomb guard).")
    expensive_per_minute: int = Field(
        60, ge=0, description="URL searches and inserts per client (IP, or key) per minute per API worker (`0`: unlimited; admin keys are not limited)."
    )
    max_decoded_bytes: int = Field(
        256 * 1024 * 1024, ge=1 << 20, description="Largest memory one image may take decoded (bytes; 16-bit and alpha count)."
    )
    default_top_k: int = Field(12, ge=1, description="Hits returned when a request names no `top_k`.")
    max_top_k: int = Field(200, ge=1, le=16384, description="Largest `top_k` a request may ask for.")
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses or CIDRs of reverse proxies (the Ingress controller) whose "
        "`X-Forwarded-For` names the client: the per-client limit counts that client, not the proxy. Empty: the "
        "connection's address.",
    )
    storage_uri: str = Field(
        "memory://",
        description="Where the per-client limit counts: `memory://` (each API worker on its own) or a shared store "
        "(`redis://HOST:6379`, for several replicas; the `limits` package's storage URIs).",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in (p.strip() for p in value.split(",") if p.strip()):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"RIS_LIMITS_TRUSTED_PROXIES: {part!r} is not an address or CIDR") from None
        return value

    @field_validator("storage_uri")
    @classmethod
    def _storage_uri(cls, value: str) -> str:
        if not re.match(r"^[a-z][a-z0-9+]*://", value):
            raise ValueError(f"RIS_LIMITS_STORAGE_URI: {value!r} is not a storage URI (memory://, redis://HOST:PORT, ...)")
        return value

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in self.trusted_proxies.split(",") if p.strip())


class VerdictSettings(BaseModel):
    """When a hit is called the same image, a near duplicate or similar (unset: the thresholds measured for the
    models). Same image and near duplicate are copy-model scores where a copy model serves."""

    same_image: float | None = Field(
        None, ge=-1, le=1, description="Score from which a hit is the same image (default: the copy model's measured threshold, or the similarity model's without one)."
    )
    near_duplicate: float | None = Field(
        None, ge=-1, le=1, description="Score from which a hit is a near duplicate (an edited copy; default: measured)."
    )
    similar: float | None = Field(
        None, ge=-1, le=1, description="Similarity score below which a hit is `unrelated` rather than `similar` (default: measured)."
    )


class Settings(BaseSettings):
    """Every knob of the service, the ingest job and the model import (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,  # RIS_MILVUS_DB_NAME -> milvus.db_name
        env_file=".env",
        extra="ignore",
    )

    data_dir: Path = Field(Path("data"), description="Root for the embedded defaults (Milvus Lite file, images).")
    model: ModelSettings = Field(default_factory=ModelSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    services: ServicesSettings = Field(default_factory=ServicesSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    verdict: VerdictSettings = Field(default_factory=VerdictSettings)

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        if self.store.backend == "s3" and not self.s3.endpoint:
            raise ValueError("RIS_STORE_BACKEND=s3 needs RIS_S3_ENDPOINT (host:port).")
        if self.store.dir is None:
            self.store.dir = self.data_dir / "images"
        if not self.milvus.uri:
            self.milvus.uri = str(self.data_dir / "milvus.db")
        return self

    @property
    def image_store_dir(self) -> Path:
        assert self.store.dir is not None  # filled by the validator
        return self.store.dir

    def but(self, **groups: dict[str, Any]) -> Settings:
        """A copy with some fields of some groups changed: ``settings.but(milvus={"timeout_s": 60})``."""
        update = {name: getattr(self, name).model_copy(update=fields) for name, fields in groups.items()}
        return self.model_copy(update=update)


def setting_fields() -> Iterator[tuple[str, Any]]:
    """(environment variable, pydantic FieldInfo) for every setting, in declaration order."""
    for name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            for sub, sub_field in group.model_fields.items():
                yield f"{ENV_PREFIX}{name}_{sub}".upper(), sub_field
        else:
            yield f"{ENV_PREFIX}{name}".upper(), field


# Kubernetes gives every pod variables for every Service of its namespace (unless the pod sets
# enableServiceLinks: false, as the product's manifests do): for Service "ris-api" with port 3000 named
# "http", RIS_API_SERVICE_HOST=10.0.0.7, RIS_API_SERVICE_PORT=3000, RIS_API_SERVICE_PORT_HTTP=3000,
# RIS_API_PORT=tcp://10.0.0.7:3000 and RIS_API_PORT_3000_TCP(_PROTO, _PORT, _ADDR). They share the
# settings' prefix without being settings: recognised by name and value, they are left alone.
_LINK_URL = re.compile(r"^(tcp|udp|sctp)://\[?[0-9A-Fa-f:.]+\]?:\d{1,5}$")
_SERVICE_LINK = re.compile(
    r"^RIS_[A-Z0-9_]+?_(?:(?P<host>SERVICE_HOST)|(?P<port>SERVICE_PORT(?:_[A-Z0-9_]+)?)"
    r"|(?P<url>PORT(?:_\d{1,5}_(?:TCP|UDP|SCTP))?)|PORT_\d{1,5}_(?:TCP|UDP|SCTP)_(?:(?P<proto>PROTO)|(?P<number>PORT)|(?P<addr>ADDR)))$"
)


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is a variable Kubernetes injects for a Service (see above)."""
    match = _SERVICE_LINK.match(name)
    if match is None:
        return False
    if match["host"] or match["addr"]:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
        return True
    if match["port"] or match["number"]:
        return value.isdigit()
    if match["proto"]:
        return value in ("tcp", "udp", "sctp")
    return bool(_LINK_URL.match(value))


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Refuse ``RIS_*`` variables that are not settings (typos, renamed settings) with advice; the
    variables Kubernetes injects for Services are not refused."""
    known = {name for name, _ in setting_fields()}
    environ = dict(os.environ if environ is None else environ)
    problems = []
    for key in sorted(environ):
        if not key.upper().startswith(ENV_PREFIX) or key.upper() in known or is_service_link(key, environ[key]):
            continue
        renamed = RENAMED.get(key.upper())
        problems.append(f"{key} (now {renamed})" if renamed else f"{key} (not a setting)")
    if problems:
        raise ValueError(
            f"Unknown RIS_* environment variables: {'; '.join(problems)}. The settings are listed in docs/settings.md "
            "(or run `ris settings`)."
        )


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return f"`{value}`" if value else "(empty)"
    value = field.default
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    """The settings table (markdown, docs/settings.md), generated from the fields above."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for env_name, field in setting_fields():
        rows.append(f"| `{env_name}` | {_default_text(field)} | {field.description} |")
    return "\n".join(rows)


class _MappingEnvSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of this process's environment."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class _GivenValues(Settings):
    """Settings from given values only (no environment, no .env file)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, **_: Any) -> tuple[Any, ...]:
        return (init_settings,)


def settings_from(environ: Mapping[str, str]) -> Settings:
    """The settings a process started with ``environ`` reads, refusals included (tests, benchmarks, tools
    that start the service with an environment of their own), without touching this process's environment."""
    check_environment(dict(environ))
    return _GivenValues(**_MappingEnvSource(Settings, environ)())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    check_environment()
    return Settings()


def main(argv: list[str] | None = None) -> int:
    """``python -m bento.core.config`` (also ``ris settings``): the settings table (docs/settings.md)."""
    import argparse

    from bento.core.output import print_result

    argparse.ArgumentParser(prog="python -m bento.core.config", description="Print every RIS_* setting (markdown).").parse_args(argv)
    return print_result(settings_table())


if __name__ == "__main__":
    raise SystemExit(main())
