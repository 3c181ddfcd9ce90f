"""`ris`: one command for everything the product does from a shell.

    ris search IMAGE|URL        the most similar images (in this process, or through --service-url)
    ris ingest FOLDER|s3://...  add images to the collection (resumable)
    ris evaluate FOLDER         measure retrieval on your photos
    ris duplicates              the duplicate report of the collection
    ris reembed                 re-embed the collection in place (another model or recipe)
    ris backup FOLDER           back up the collection (vectors; --images: originals too)
    ris restore FOLDER          restore a backup into the settings' Milvus and image store
    ris models ...              import, export or show the model the service loads
    ris keys new ...            make an API key
    ris settings                every RIS_* setting with its default

Settings come from RIS_* environment variables (`ris settings`); an API key from $RIS_AUTH_CLIENT_KEY or
--api-key-file, never required on the command line. Exit codes: 0 done, 1 the work failed (the reason and
what to do next are printed), 2 a usage error (bad option or setting, a missing file or folder), 130
interrupted. `python -m ingest`, `python -m models`, ... keep working.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx

from bento.core.cli import UsageError, run_tool
from bento.core.config import Settings
from bento.core.errors import BackendUnavailable, error_from_answer
from bento.core.output import print_result
from bento.domain.schemas import SearchOptions, SearchResponse

# The subcommands that are the modules' own command lines, by name: (main, one-line help).
Main = Callable[..., int]


def _delegates() -> dict[str, tuple[Main, str]]:
    from bento.http import auth
    from ingest import __main__ as ingest_main
    from ingest import backup, duplicates, evaluate, reembed
    from models import __main__ as models_main

    return {
        "ingest": (ingest_main.main, "add a folder or s3:// prefix of images to the collection (resumable)"),
        "evaluate": (evaluate.main, "measure retrieval (recall@1, same-photo) on a folder of your photos"),
        "duplicates": (duplicates.main, "report the duplicate images of the collection"),
        "reembed": (reembed.main, "re-embed the collection in place from its stored originals"),
        "backup": (
            lambda rest, prog: backup.main(["backup", *rest], prog=prog.rsplit(" ", 1)[0]),
            "back up the collection's vectors (and with --images its originals) into a folder",
        ),
        "restore": (
            lambda rest, prog: backup.main(["restore", *rest], prog=prog.rsplit(" ", 1)[0]),
            "restore a backup into the settings' Milvus (and image store)",
        ),
        "models": (models_main.main, "import, export or show the model the service loads"),
        "keys": (auth.main, "make an API key (`ris keys new --name NAME --scope SCOPE`)"),
    }


def product_version() -> str:
    try:
        return version("reverse-image-search")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown"


def _parser(delegates: dict[str, tuple[Main, str]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ris", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ris {product_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    search = commands.add_parser(
        "search", help="the most similar images to an image file or URL",
        description="Search the collection with an image file or an http(s) URL: in this process (the settings' "
        "Milvus and image store, the model loaded here), or through a running service (--service-url).",
    )
    search.add_argument("query", help="an image file, or an http(s) URL of one")
    search.add_argument("--top-k", type=int, default=10, help="hits to show (default 10)")
    search.add_argument("--mode", choices=("both", "copies", "similar"), default="both",
                        help="both: copies first, then similar images (default); copies or similar: one list")
    search.add_argument("--label", help="only images with this label")
    search.add_argument("--min-score", type=float, help="only hits scoring at least this (cosine, -1..1)")
    search.add_argument("--service-url", help="search through a running service (default: in this process)")
    search.add_argument("--api-key-file", type=Path, help="a file holding the service's key (default: $RIS_AUTH_CLIENT_KEY)")
    search.add_argument("--json", action="store_true", help="print the service's JSON answer")
    settings = commands.add_parser("settings", help="every RIS_* setting with its default and meaning")
    settings.add_argument("--json", action="store_true", help="as JSON: [{variable, default, meaning}]")
    for name, (_, summary) in delegates.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegates = _delegates()
    if argv and argv[0] in delegates:  # the module's own command line, under its `ris` name
        command, rest = argv[0], argv[1:]
        return delegates[command][0](rest, prog=f"ris {command}")
    args = _parser(delegates).parse_args(argv)
    if args.command == "settings":
        return print_result(_settings(args.json))
    return run_tool("search", lambda settings: _search(args, settings), verbose=False)


def _settings(as_json: bool) -> str:
    from bento.core.config import setting_fields, settings_table

    if not as_json:
        return settings_table()
    rows = [
        {"variable": name, "default": None if field.is_required() else _jsonable(field.get_default(call_default_factory=True)),
         "meaning": field.description or ""}
        for name, field in setting_fields()
    ]
    return json.dumps(rows, indent=2)


def _jsonable(value: object) -> object:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _search(args: argparse.Namespace, settings: Settings) -> int:
    is_url = args.query.startswith(("http://", "https://"))
    if not is_url and not Path(args.query).is_file():
        raise UsageError(f"{args.query} is not a file (or an http(s) URL).")
    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1.")
    options = SearchOptions(mode=args.mode, top_k=args.top_k, label=args.label, min_score=args.min_score)
    if args.service_url:
        answer = _search_service(args, settings, options, is_url)
    else:
        answer = _search_here(args, settings, options, is_url)
    return print_result(answer.model_dump_json(indent=2) if args.json else _table(answer))


def _search_here(args: argparse.Namespace, settings: Settings, options: SearchOptions, is_url: bool) -> SearchResponse:
    from bento.adapters.assembly import open_catalog
    from bento.adapters.fetch import UrlFetcher
    from bento.http.responses import search_response
    from models.store import load_embedders

    if is_url:
        data = asyncio.run(UrlFetcher(settings.fetch, settings.limits.max_upload_bytes).fetch(args.query))
    else:
        data = Path(args.query).read_bytes()
    catalog = open_catalog(settings, load_embedders(settings))
    try:
        return search_response(catalog, catalog.search_image(data, options))
    finally:
        catalog.close()


def _search_service(args: argparse.Namespace, settings: Settings, options: SearchOptions, is_url: bool) -> SearchResponse:
    key = args.api_key_file.read_text().strip() if args.api_key_file else settings.auth.client_key.get_secret_value()
    headers = {"X-API-Key": key} if key else {}
    fields = {name: value for name, value in options.model_dump().items() if value is not None}
    base = args.service_url.rstrip("/")
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            if is_url:
                response = client.post("/api/search/url", json={**fields, "url": args.query})
            else:
                with open(args.query, "rb") as image:
                    files = {"file": (Path(args.query).name, image)}
                    response = client.post("/api/search", files=files, data={k: str(v) for k, v in fields.items()})
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"{base}: {exc.__class__.__name__}: {exc}") from exc
    if response.status_code >= 400:
        raise error_from_answer(base, response.status_code, response.text)
    return SearchResponse.model_validate_json(response.content)


def _table(answer: SearchResponse) -> str:
    if not answer.hits:
        return f"No hits ({answer.model}{', ' + answer.copy_model if answer.copy_model else ''})."
    lines = [f"{'#':>3}  {'score':>6}  {'verdict':<14}  {'id':<12}  {'label':<16}  source"]
    for rank, hit in enumerate(answer.hits, start=answer.offset + 1):
        lines.append(f"{rank:>3}  {hit.score:>6.3f}  {hit.verdict or '':<14}  {hit.id[:12]}  {hit.label[:16]:<16}  {hit.source}")
    lines.append(f"({len(answer.hits)} hits; {answer.model}{', copies: ' + answer.copy_model if answer.copy_model else ''})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
