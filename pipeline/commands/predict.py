"""`nppnet predict`: parsing, keypoints and overlays for image files.

--model is a `.keras` model (or a directory holding `model.keras`), a
SavedModel export (an export base, `EXPORT_BASE/nppnet` or a version
directory: its `serving_default` signature is used), or an MLflow model
URI (`models:/nppnet-lip@champion`, `models:/nppnet-lip/3`, `runs:/<run
id>/model`), downloaded into a temporary directory: its `saved_model/`
if it has one, else its Keras model. Whatever the form, images go through
the serving graph (decode, whole-image letterbox, flip test, original
resolution), so the results are those the model server returns.

Writes, per image, into --out: `<stem>_parsing.png` (class ids 0..19 at
the original resolution), `<stem>_keypoints.json` (16 joints in model and
LIP order: name, x, y in original pixels, score) and `<stem>_overlay.png`
(coloured mask and skeleton over the photo). An image that cannot be read
or decoded is reported and skipped; the exit status is then 1.

    nppnet predict photos/*.jpg --model runs/lip/export --out predictions/
    nppnet predict photos/ --model models:/nppnet-lip@champion \\
        --config configs/lip.yaml --out predictions/
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
MLFLOW_SCHEMES = ("models:/", "runs:/")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="parsing PNG, keypoints JSON and overlay for image files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="image files, or directories of .jpg/.jpeg/.png/.bmp/.gif files",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a .keras model, a SavedModel export, or models:/NAME@ALIAS, "
        "models:/NAME/VERSION, runs:/RUN_ID/PATH",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="Keras models only: network input side S (default: the input "
        "shape the model was built with)",
    )
    parser.add_argument(
        "--no-flip",
        action="store_true",
        help="Keras models only: no flip test (an export has it built in)",
    )
    parser.add_argument(
        "--model-name",
        default="nppnet",
        help="served model name inside an export base (default: nppnet)",
    )
    parser.add_argument(
        "--config", help="run config YAML (MLflow tracking URI for models:/)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    parser.set_defaults(handler=run)


def image_files(paths: list[Path]) -> list[Path]:
    """The files to predict: files as given, directories expanded (sorted,
    image suffixes only).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no images, or two images with the same file stem (their
            output files would collide).
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    if not files:
        raise ValueError(f"no image files in {[str(p) for p in paths]}")
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise ValueError(
                f"{stems[file.stem]} and {file} share the stem {file.stem!r}; "
                "their output files would overwrite each other"
            )
        stems[file.stem] = file
    return files


def _is_saved_model(path: Path, model_name: str) -> bool:
    from nppnet_tf.serving.layout import find_version_dir

    try:
        find_version_dir(path, model_name)
    except FileNotFoundError:
        return False
    return True


def _local_predictor(path: Path, args: argparse.Namespace, source: str):
    """A predictor for a local SavedModel or Keras model."""
    from nppnet_tf.export import load_keras_model
    from nppnet_tf.serving.predictor import KerasPredictor, SavedModelPredictor

    if path.is_dir() and _is_saved_model(path, args.model_name):
        if args.image_size is not None or args.no_flip:
            raise ValueError(
                f"--image-size and --no-flip apply to Keras models; the "
                f"export {path} has its input size and flip test built in"
            )
        predictor = SavedModelPredictor(path, args.model_name)
        predictor.source = source
        return predictor
    model = load_keras_model(path)
    return KerasPredictor(
        model, args.image_size, flip=not args.no_flip, source=source
    )


def _downloaded_model(root: Path, uri: str) -> Path:
    """The SavedModel (preferred) or Keras model inside downloaded MLflow
    artifacts."""
    for candidate in (root / "saved_model", root):
        if candidate.is_dir() and (candidate / "saved_model.pb").is_file():
            return candidate
    if (root / "saved_model").is_dir():
        return root / "saved_model"
    keras_files = sorted(root.rglob("*.keras"))
    if keras_files:
        return keras_files[0]
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*"))[:20]
    raise FileNotFoundError(
        f"{uri} holds neither saved_model/ nor a .keras model (found {found})"
    )


def _mlflow_predictor(args: argparse.Namespace, download_dir: Path):
    from nppnet_tf.config import RunConfig, load_config
    from pipeline.registry import download_model

    config = load_config(args.config) if args.config else RunConfig()
    log.info("downloading %s", args.model)
    root = download_model(args.model, download_dir, config)
    path = _downloaded_model(root, args.model)
    log.info("using %s from %s", path.relative_to(root), args.model)
    return _local_predictor(path, args, args.model)


def run(args: argparse.Namespace) -> int:
    files = image_files(args.images)
    is_uri = args.model.startswith(MLFLOW_SCHEMES)
    if not is_uri and not Path(args.model).exists():
        raise FileNotFoundError(f"--model {args.model} does not exist")
    with tempfile.TemporaryDirectory(prefix="nppnet-predict-") as tmp:
        if is_uri:
            predictor = _mlflow_predictor(args, Path(tmp))
        else:
            predictor = _local_predictor(
                Path(args.model), args, str(Path(args.model).resolve())
            )
        failed = _predict_files(predictor, files, args)
    written = len(files) - len(failed)
    print(
        f"predicted {written}/{len(files)} images with {args.model} -> "
        f"{args.out}"
        + "".join(f"\n  FAILED {path}: {reason}" for path, reason in failed)
    )
    return 1 if failed else 0


def _predict_files(predictor, files: list[Path], args) -> list[tuple[str, str]]:
    import tensorflow as tf
    from tqdm import tqdm

    from nppnet_tf.serving.module import error_message
    from nppnet_tf.serving.predictor import write_prediction_files

    failed: list[tuple[str, str]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(
        files, desc="predict", unit="image", disable=args.no_progress
    ):
        try:
            data = path.read_bytes()
            prediction = predictor(data)
        except OSError as err:
            reason = f"cannot read: {err}"
        except tf.errors.InvalidArgumentError as err:
            reason = error_message(err)
        else:
            write_prediction_files(
                prediction,
                data,
                str(path),
                args.out,
                path.stem,
                predictor.source,
            )
            continue
        log.error("skipping %s: %s", path, reason)
        failed.append((str(path), reason))
    return failed
