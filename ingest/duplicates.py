"""`python -m ingest.duplicates`: a report of the duplicate images in the collection.

Exact duplicates (the same pixels in different files) and near duplicates (edited copies scoring at least
the near-duplicate threshold: the model's measured one, RIS_VERDICT_NEAR_DUPLICATE, or --threshold),
grouped, larger groups first. Compared on the copy vectors where a copy model serves (it is made for this
question), else on the similarity vectors: as the service's duplicate review. It changes no image (it
creates the copy collection, empty, where none exists yet: then it says to run `ris reembed`).
"""

from __future__ import annotations

import argparse

from bento.adapters.vectors import open_indexes
from bento.core.cli import UsageError, run_tool
from bento.core.config import Settings
from bento.core.errors import Conflict
from bento.domain.schemas import Thresholds


def main(argv: list[str] | None = None, prog: str = "python -m ingest.duplicates") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, help="near-duplicate score threshold (default: the model's measured one)")
    parser.add_argument("--groups", type=int, default=50, help="groups to list (default 50; --json lists all)")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    return run_tool("duplicates", lambda settings: _report(args, settings), verbose=False)


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from models.store import load_embedders

    # The models decide which collection and which threshold (the same rule as the service's), so they are
    # loaded, though nothing is embedded.
    embedders = load_embedders(settings)
    similarity = embedders.describe().info
    copy = embedders.describe_copy()
    copy_model = copy.info if copy is not None else None
    verdict = settings.verdict if args.threshold is None else settings.verdict.model_copy(update={"near_duplicate": args.threshold})
    threshold = Thresholds.resolve(verdict, similarity, copy_model).near_duplicate
    if threshold is None:
        raise UsageError("no near-duplicate threshold is known for this model; pass --threshold")
    similarity_index, copy_index = open_indexes(settings, similarity, copy_model)
    try:
        if copy_index is not None:
            # Images added before the copy model have no copy vector: a report on the copy vectors would
            # silently leave them out.
            missing = similarity_index.count() - copy_index.count()
            if missing > 0:
                raise Conflict(
                    f"{missing} images of the collection have no copy vector yet (added before the copy model): "
                    "run `ris reembed` to add them, then report again."
                )
        report = (copy_index or similarity_index).find_duplicates(threshold)
    finally:
        for index in (similarity_index, copy_index):
            if index is not None:
                index.close()
    if args.json:
        print(report.model_dump_json(indent=2))  # noqa: T201
        return 0
    print(  # noqa: T201
        f"{report.image_count} images: {report.exact_groups} groups of exact duplicates, {report.near_groups} groups of near "
        f"duplicates (score >= {threshold:.3f}); {report.read_ms / 1000:.1f} s reading, {report.compare_ms / 1000:.1f} s comparing."
    )
    for group in report.groups[: args.groups]:
        members = ", ".join(f"{m.id[:12]} ({m.score:.3f})" for m in group.members)
        print(f"- {group.kind}: {members}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
