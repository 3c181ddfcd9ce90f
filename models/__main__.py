"""`python -m models import|export-openvino|show`: manage embedding models in the BentoML model store.

export-openvino converts the stored weights to an OpenVINO model checked against PyTorch (build time of
the CPU image, which then runs without PyTorch: bentofile.cpu.yaml)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bento.config import get_settings
from models.backbones import model_choices
from models.store import export_openvino, import_model, resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import the backbone chosen by the settings into the model store")
    imp.add_argument("--model", choices=model_choices(), help="overrides RIS_MODEL_NAME")
    imp.add_argument("--resnet50-weights", help="overrides RIS_MODEL_RESNET50_WEIGHTS (name, .pth path, or random)")
    export = sub.add_parser(
        "export-openvino", help="convert the stored weights to an OpenVINO model (for the CPU image, which has no PyTorch)"
    )
    export.add_argument("--model", choices=model_choices(), help="overrides RIS_MODEL_NAME")
    export.add_argument(
        "--fidelity-images", type=Path, metavar="DIR", required=True,
        help="typical photos to check the conversion on (8 are sampled; the ingest folder will do)",
    )
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
    elif args.command == "export-openvino":
        stored = export_openvino(settings, args.fidelity_images)
    else:
        stored = resolve_model(settings, import_if_missing=False)
    print(json.dumps(stored.info.model_dump(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
