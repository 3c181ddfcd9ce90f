"""`python -m ingest.reembed`: re-embed the collection from its stored originals with the serving models and
recipes, in place (the collection keeps its name), resumably.

Two collections are brought in step, each only where it needs it: the similarity collection C (rebuilt as
below when its model or recipe changed, kept as it is otherwise) and the copy collection ``C__copy`` (filled
in place with the copy vectors its images lack, e.g. a collection made before the copy model existed; rebuilt
aside as ``C__copy__reembed`` and swapped in when another copy model made it).

A collection made by another model or preprocessing recipe is refused by every entry point (the vectors
would not be comparable). This job rebuilds it: every image of collection C is read back from the image
store, embedded again (all views of today's recipe) and written, with its label, source and date, into
``C__reembed``; then C is dropped and ``C__reembed`` takes its name. Interrupted at any point, the same
command continues: images already in ``C__reembed`` are skipped, and a crash between the drop and the
rename is finished by the next run. Stop the service first when it uses a Milvus Lite file (one process
per file); on a Milvus server, restart it after the swap.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from bento.adapters.assembly import open_catalog
from bento.adapters.vectors import VectorIndex, copy_collection
from bento.core.cli import run_tool
from bento.core.config import Settings
from bento.core.errors import SearchError
from bento.core.iterate import batched
from bento.core.retry import RetryPolicy
from bento.domain.catalog import Catalog, NewImage
from bento.domain.ports import Embedding
from bento.domain.schemas import ImageMetadata, ModelDescription
from models.backbones import Role

logger = logging.getLogger(__name__)
SUFFIX = "__reembed"


@dataclass
class ReembedReport:
    collection: str
    image_count: int = 0  # images in the collection (read so far)
    embedded: int = 0
    already_done: int = 0
    missing_originals: list[str] = field(default_factory=list)
    swapped: bool = False
    copies_added: int = 0  # copy vectors written (0 without a copy model)

    def summary(self) -> str:
        lines = [
            f"Re-embedded {self.embedded} images of {self.image_count} in '{self.collection}' ({self.already_done} were done before)."
        ]
        if self.copies_added:
            lines.append(f"Added copy vectors for {self.copies_added} images.")
        if self.missing_originals:
            lines.append(
                f"{len(self.missing_originals)} images have no stored original and cannot be re-embedded, e.g. "
                f"{', '.join(self.missing_originals[:3])}; the old collection is kept. Rerun with --drop-missing to "
                "leave them out."
            )
        lines.append("The collection now holds the new embeddings." if self.swapped else "Not swapped yet: rerun to finish.")
        return "\n".join(lines)


class _SimilarityOnly:
    """An Embedding port's similarity model alone (the similarity collection is rebuilt without copies)."""

    def __init__(self, embedding: Embedding) -> None:
        self._embedding = embedding

    def describe(self) -> ModelDescription:
        return self._embedding.describe()

    def describe_copy(self) -> ModelDescription | None:
        return None

    def embed(self, pixels: object, role: Role = "similarity") -> object:
        return self._embedding.embed(pixels, role)  # type: ignore[arg-type]


def reembed(settings: Settings, embedding: Embedding, retry: RetryPolicy, batch_size: int = 32, drop_missing: bool = False) -> ReembedReport:
    """Bring the similarity collection, then the copy collection, in step with the serving models."""
    report = _reembed_similarity(settings, embedding, retry, batch_size, drop_missing)
    copy = retry.call(embedding.describe_copy)
    if report.swapped and copy is not None:
        report.copies_added = _fill_copies(settings, embedding, copy, retry, batch_size, report)
        report.swapped = not report.missing_originals or drop_missing
    return report


def _from_originals(catalog: Catalog, batch: list[ImageMetadata], retry: RetryPolicy, report: ReembedReport) -> list[NewImage]:
    """The images of ``batch`` read back from the image store and prepared (labels, sources and dates kept);
    those whose original is missing are reported."""
    images = []
    for image in batch:
        if not retry.call(catalog.store.exists, image.id, "original"):
            report.missing_originals.append(image.id)
            continue
        prepared = catalog.prepare(retry.call(catalog.store.get, image.id, "original"), to_store=True)
        images.append(NewImage(prepared, image.label, image.source, image.created_at))
    return images


def _fill_copies(
    settings: Settings, embedding: Embedding, copy: ModelDescription, retry: RetryPolicy, batch_size: int, report: ReembedReport
) -> int:
    """Write the copy vectors the images of the (now current) similarity collection lack. Resumable: images
    with a copy row are skipped. A copy collection of another model is rebuilt aside and swapped in."""

    name = copy_collection(settings.milvus.collection)
    similarity = VectorIndex(settings, retry.call(embedding.describe).info)
    probe = VectorIndex(settings, copy.info, name)
    props = retry.call(probe.properties_of, name)
    target_name = name if props is None or all(props.get(k) == v for k, v in probe.model_properties().items()) else name + SUFFIX
    probe.close()
    if target_name != name:
        logger.info("'%s' holds another copy model's vectors; rebuilding it as '%s'", name, target_name)
    copies = VectorIndex(settings, copy.info, target_name)
    catalog = open_catalog(settings, embedding, retry=retry, vectors=similarity, copies=copies)
    added = 0
    try:
        copies.ensure_ready()
        for batch in batched(similarity.images_of(settings.milvus.collection), batch_size):
            done = retry.call(copies.existing_ids, [image.id for image in batch])
            images = _from_originals(catalog, [image for image in batch if image.id not in done], retry, report)
            catalog.add_many(images, write_blobs=False)  # the similarity rows exist: only copy rows are written
            added += len(images)
            logger.info("Copy vectors written for %d images so far", added)
        if target_name != name and not report.missing_originals:
            copies.flush()
            retry.call(copies.take_name_of, name)
        return added
    finally:
        catalog.close()


def _reembed_similarity(
    settings: Settings, embedding: Embedding, retry: RetryPolicy, batch_size: int, drop_missing: bool
) -> ReembedReport:
    name = settings.milvus.collection
    target_settings = settings.but(milvus={"collection": name + SUFFIX})
    catalog = open_catalog(target_settings, _SimilarityOnly(embedding), retry=retry)
    target = catalog.vectors
    if not isinstance(target, VectorIndex):  # in_process always opens a VectorIndex
        raise TypeError("reembed needs an in-process vector index")
    report = ReembedReport(collection=name)
    try:
        source = retry.call(target.properties_of, name)
        if source is None:
            if retry.call(target.properties_of, name + SUFFIX) is None:
                raise SearchError(f"There is no collection '{name}' to re-embed.")
            logger.info("Finishing an interrupted swap: '%s%s' takes the name '%s'", name, SUFFIX, name)
            retry.call(target.take_name_of, name)
            report.swapped = True
            return report
        wanted = target.model_properties()
        if all(source.get(key) == value for key, value in wanted.items()):
            logger.info("'%s' already holds embeddings of %s with this recipe: nothing to do", name, embedding.describe().info.model_id)
            report.swapped = True
            return report
        target.ensure_ready()  # creates C__reembed with today's model and recipe (or checks it)
        for batch in batched(target.images_of(name), batch_size):
            report.image_count += len(batch)
            done = retry.call(target.existing_ids, [image.id for image in batch])
            report.already_done += len(done)
            images = _from_originals(catalog, [image for image in batch if image.id not in done], retry, report)
            catalog.add_many(images, write_blobs=False)
            report.embedded += len(images)
            logger.info("Re-embedded %d of the %d images read so far", report.embedded + report.already_done, report.image_count)
        if report.missing_originals and not drop_missing:
            return report
        target.flush()
        retry.call(target.take_name_of, name)
        report.swapped = True
        return report
    finally:
        catalog.close()


def main(argv: list[str] | None = None, prog: str = "python -m ingest.reembed") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="images embedded together (default 32)")
    parser.add_argument("--retry-seconds", type=float, default=60.0, help="ride out an unavailable Milvus or store this long")
    parser.add_argument("--drop-missing", action="store_true", help="swap even if some images have no stored original (they are left out)")
    args = parser.parse_args(argv)
    return run_tool("reembed", lambda settings: _reembed(args, settings), on_failure="Nothing is lost; rerun the same command to continue.")


def _reembed(args: argparse.Namespace, settings: Settings) -> int:
    from models.store import load_embedders

    retry = RetryPolicy(deadline_s=max(0.0, args.retry_seconds))
    report = reembed(settings, load_embedders(settings), retry, max(1, args.batch_size), args.drop_missing)
    print(report.summary())  # noqa: T201
    return 0 if report.swapped else 1


if __name__ == "__main__":
    raise SystemExit(main())
