"""`python -m models import|list`: manage embedding models in the BentoML model store."""

from __future__ import annotations

import argparse
import json
import logging

from bento.config import get_settings
from models.backbones import model_choices
from models.store import import_model, resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import the backbone chosen by the settings into the model store")
    imp.add_argument("--model", choices=model_choices(), help="overrides RIS_MODEL_NAME")
    imp.add_argument("--resnet50-weights", help="overrides RIS_MODEL_RESNET50_WEIGHTS (name, .pth path, or random)")
    sub.add_parser("show", help="show the model the service would load (imports nothing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    overrides = {}
    if getattr(args, "model", None):
        overrides["name"] = args.model
    if getattr(args, "resnet50_weights", None):
        overrides["resnet50_weights"] = args.resnet50_weights
    settings = get_settings().but(model=overrides)
    if args.command == "import":
        stored = import_model(settings)
    else:
        stored = resolve_model(settings, import_if_missing=False)
    print(json.dumps(stored.info.model_dump(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
