"""What `prepare_dump` checks before any compute, each failure a `BLDAError` naming the option:
the counts, the weights to load, the model's test protocol against the inference options,
the dataset's files and the pixel sampling."""

from __future__ import annotations

from blda_tools.datasets import build_dataset
from blda_tools.errors import BLDAError
from blda_tools.fileio import check_input_file
from blda_tools.inference.pixel_sampling import PixelSampling
from blda_tools.inference.predict import InferenceSettings
from blda_tools.inference.protocols import resolve_inference
from blda_tools.inference.tasks import check_classifier_inference
from blda_tools.models.loading import TORCHSCRIPT, declared_family
from blda_tools.store.schema import MAX_NAME_BYTES


def check_model(model_spec: str, checkpoint, random_weights: bool, inference):
    """(protocol, inference settings, task) of the model, checked before any image is read:
    the weights to load, and inference options that contradict the model's test protocol."""
    check_weights(model_spec, checkpoint, random_weights)
    if checkpoint is not None:
        check_input_file(checkpoint, f"--checkpoint {checkpoint}", "a checkpoint file")
    declared_protocol, task = declared_family(model_spec)
    check_classifier_inference(inference, task == "classification")  # before the protocol's
    if isinstance(inference, InferenceSettings):
        return "as given", inference, task
    return (*resolve_inference(declared_protocol, inference), task)


def open_dataset(dataset: str, data_root, split: str | None, options: dict | None):
    """The dataset, its errors naming --data-root (where its files were looked for) unless
    they name the option at fault themselves (--split)."""
    if split is not None and not isinstance(split, str):
        raise BLDAError(f"--split: expected a split name or a list file, got {split!r}")
    try:
        return build_dataset(dataset, data_root, split, **(options or {}))
    except BLDAError as error:
        if str(error).startswith("--"):
            raise
        raise BLDAError(f"--data-root {data_root}: {error}") from None


def check_sampling(
    sampling: PixelSampling | None, classification: bool, dataset: str
) -> PixelSampling:
    """The pixel sampling (default: every pixel); a classification dataset takes none."""
    sampling = PixelSampling() if sampling is None else sampling
    if not isinstance(sampling, PixelSampling):
        raise BLDAError(
            f"sampling: expected a PixelSampling (stride, pixels_per_image, stratified, seed) "
            f"or None, got {type(sampling).__name__}"
        )
    if classification and sampling != PixelSampling(seed=sampling.seed):
        raise BLDAError(
            f"--dataset {dataset}: a classification dataset stores one row per image; "
            "--stride, --pixels-per-image and --stratified do not apply"
        )
    return sampling


def check_archive_options(model_spec: str, weights: str, trust_checkpoint: bool) -> None:
    """A TorchScript archive is loaded whole by torch.jit.load: no student or teacher to
    choose, nothing unpickled to trust."""
    if model_spec != TORCHSCRIPT:
        return
    for option, meaningless in ((f"--weights {weights}", weights != "student"),
                                ("--trust-checkpoint", trust_checkpoint)):  # fmt: skip
        if meaningless:
            raise BLDAError(
                f"{option} and --model torchscript: a TorchScript archive is loaded whole "
                "(torch.jit.load), with no weights to choose and nothing unpickled"
            )


def check_weights(model_spec: str, checkpoint, random_weights: bool) -> None:
    """Refuse to run a built-in architecture on random weights unless asked to."""
    if random_weights and checkpoint is not None:
        raise BLDAError(
            "--random-weights and --checkpoint: the weights come from the checkpoint; give one"
        )
    builtin = model_spec != TORCHSCRIPT and ":" not in model_spec
    if random_weights and not builtin:  # accepted, and without any effect
        raise BLDAError(
            f"--random-weights: only for the built-in architectures; --model {model_spec} "
            "brings its own weights (a TorchScript file, or what a plugin factory returns)"
        )
    if builtin and checkpoint is None and not random_weights:
        raise BLDAError(
            f"--model {model_spec}: no --checkpoint, so the model would run on random weights; "
            "pass --checkpoint FILE, or --random-weights to do that on purpose"
        )


def check_image_names(names) -> None:
    """Refuse, before any image is predicted, a name the store cannot record (the writer's
    check found it only when that image came up, leaving an unfinished store that every
    --resume stopped at)."""
    for name in names:
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise BLDAError(
                f"image {name[:80]!r}...: its name (the path below --data-root) is longer than "
                f"{MAX_NAME_BYTES} bytes (UTF-8), the most a store records; shorten its folders"
            )
