"""`python -m ingest FOLDER`: add an image folder (class sub-folders give labels) to the collection."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bento.adapters.assembly import open_catalog
from bento.core.cli import UsageError, run_tool
from bento.core.config import Settings
from bento.core.retry import RetryPolicy
from bento.domain.ports import Embedding
from ingest.job import IngestJob, IngestOptions
from ingest.remote import RemoteEmbedding
from ingest.sources import S3_SCHEME, is_sidecar, open_source


def main(argv: list[str] | None = None, prog: str = "python -m ingest") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Ingest an ImageNet-style folder (<folder>/<label>/<image>) or bucket prefix "
        "(s3://BUCKET/PREFIX, read with the RIS_S3_* settings). Safe to interrupt and rerun.",
    )
    parser.add_argument("source", help="a folder, or s3://BUCKET/PREFIX")
    parser.add_argument("--batch-size", type=int, default=32, help="images embedded together (default 32)")
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: cores, max 4)")
    parser.add_argument("--service-url", help="embed through a running service (e.g. http://127.0.0.1:3000)")
    parser.add_argument(
        "--api-key", help="the service's API key with the admin scope (default: $RIS_AUTH_CLIENT_KEY)"
    )
    parser.add_argument(
        "--retry-seconds", type=float, default=60.0,
        help="keep retrying an unavailable Milvus, store or service this long (default 60)",
    )
    parser.add_argument(
        "--shard-index", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")),
        help="this run's shard (default: $JOB_COMPLETION_INDEX of a Kubernetes Indexed Job, else 0)",
    )
    parser.add_argument("--shard-count", type=int, default=1, help="number of shards splitting the source (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    return run_tool("ingest", lambda settings: _ingest(args, settings), on_failure=RESUME)


RESUME = "Nothing written so far is lost; rerun the same command to continue."


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    options = IngestOptions(batch_size=max(1, args.batch_size), progress=not args.no_progress)
    options.shard_index, options.shard_count = args.shard_index, max(1, args.shard_count)
    if args.workers:
        options.workers = max(1, args.workers)
    retry = RetryPolicy(deadline_s=max(0.0, args.retry_seconds))
    embedding: Embedding | None = None
    if not args.source.startswith(S3_SCHEME) and not Path(args.source).is_dir():
        raise UsageError(f"{args.source} is not a folder.")
    try:
        source = open_source(args.source, settings)  # a wrong path or URL fails before the model loads
        if not any(not is_sidecar(file.name) for file in source.files()):  # stops at the first image
            raise UsageError(f"{source.location} holds no images (hidden and sidecar files are skipped).")
        if args.service_url:
            key = args.api_key or settings.auth.client_key.get_secret_value()
            embedding = RemoteEmbedding(args.service_url, retry, key)
        else:
            from models.store import load_embedders

            folder = not args.source.startswith(S3_SCHEME)
            if settings.model.precision == "int8" and settings.model.int8_calibration_dir is None and folder:
                # The photos being ingested are the most typical calibration set there is.
                settings = settings.but(model={"int8_calibration_dir": Path(args.source)})
            embedding = load_embedders(settings)
        catalog = open_catalog(settings, embedding, retry=retry)
        try:
            report = IngestJob(catalog, options).run(source)
        finally:
            catalog.close()
    finally:
        if isinstance(embedding, RemoteEmbedding):
            embedding.close()
    print(report.model_dump_json(indent=2) if args.json else report.summary())
    return 130 if report.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
