"""`python -m models import|export-openvino|show`: manage embedding models in the BentoML model store.

export-openvino converts the stored weights to an OpenVINO model checked against PyTorch (build time of
the CPU image, which then runs without PyTorch: bentofile.cpu.yaml)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bento.core.cli import run_tool
from bento.core.config import Settings
from models.backbones import backbones_of, get_backbone, model_choices
from models.store import export_openvino, import_model, resolve_model


def main(argv: list[str] | None = None, prog: str = "python -m models") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import the backbone chosen by the settings into the model store")
    # The stored models of both roles: the similarity models and Meta's SSCD (the packaged copy models are
    # read from their package at every start and never stored: their licence).
    stored_copy_models = tuple(backbone.name for backbone in backbones_of("copy"))
    imp.add_argument(
        "--model", choices=(*model_choices(), *stored_copy_models),
        help="overrides RIS_MODEL_NAME (a copy model, sscd-resnet50: RIS_MODEL_COPY_NAME)",
    )
    imp.add_argument("--resnet50-weights", help="overrides RIS_MODEL_RESNET50_WEIGHTS (name, .pth path, or random)")
    imp.add_argument(
        "--sscd-weights",
        help="overrides RIS_MODEL_SSCD_WEIGHTS (disc_mixup, disc_large, a Meta .torchvision.pt/.torchscript.pt path, or random)",
    )
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
    return run_tool("models", lambda settings: _run(args, settings))


def _run(args: argparse.Namespace, settings: Settings) -> int:
    overrides = {}
    role = "similarity"
    if getattr(args, "model", None):
        role = get_backbone(args.model).role if args.model != "auto" else "similarity"
        overrides["copy_name" if role == "copy" else "name"] = args.model
    for option in ("resnet50_weights", "sscd_weights"):
        if getattr(args, option, None):
            overrides[option] = getattr(args, option)
    settings = settings.but(model=overrides)
    if args.command == "import":
        stored = import_model(settings, role)
    elif args.command == "export-openvino":
        stored = export_openvino(settings, args.fidelity_images)
    else:
        stored = resolve_model(settings, import_if_missing=False)
    print(json.dumps(stored.info.model_dump(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
