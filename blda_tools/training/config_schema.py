"""The training configuration's schema: one dataclass per section, every key's default, and
`KEY_DOCS`, the one-line meaning of every key (`docs/training.md` lists them).

Loading, overrides and validation are in `blda_tools.training.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# --------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    seed: int = 0
    iterations: int = 40000
    batch_size: int = 2
    accumulate: int = 1
    device: str = "auto"
    amp: str = "none"
    num_workers: int = 2
    log_interval: int = 50
    checkpoint_interval: int = 4000
    live: bool = True


@dataclass
class ModelConfig:
    arch: str = "daformer_mitb5"
    backbone_weights: str = ""
    pretrained: str = ""
    trust_checkpoint: bool = False


@dataclass
class DataConfig:
    root: str = ""
    source: str = "gta5"
    source_root: str = "gta"
    source_split: str = "all"
    source_size: list[int] = field(default_factory=lambda: [720, 1280])
    target: str = "cityscapes"
    target_root: str = "cityscapes"
    target_split: str = "train"
    target_size: list[int] = field(default_factory=lambda: [512, 1024])
    val_split: str = "val"


@dataclass
class AugmentConfig:
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    flip: bool = True
    cat_max_ratio: float = 0.75
    color_jitter_strength: float = 0.2
    color_jitter_probability: float = 0.2
    blur: bool = True


@dataclass
class SelfTrainingConfig:
    enabled: bool = True
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    ignore_top_rows: int = 15
    ignore_bottom_rows: int = 120
    mix: str = "class"
    pseudo_weight_pooling: str = "batch"
    crop_pseudo_margins: list[int] = field(default_factory=list)


@dataclass
class HRDAConfig:
    # HRDA models only (model.arch hrda_*); defaults are the released HRDA / MIC values.
    detail_crop_size: list[int] = field(default_factory=lambda: [512, 512])
    crop_coord_divisible: int = 8
    detail_loss_weight: float = 0.1


@dataclass
class MICConfig:
    # Masked image consistency (training/masking.py); defaults are MIC's released values.
    enabled: bool = False
    mask_block_size: int = 64
    mask_ratio: float = 0.7
    loss_weight: float = 1.0


@dataclass
class RareClassSamplingConfig:
    enabled: bool = True
    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5


@dataclass
class FeatureDistanceConfig:
    enabled: bool = False
    weight: float = 0.005
    classes: list[int] = field(default_factory=lambda: [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
    scale_min_ratio: float = 0.75
    imagenet_weights: str = ""


@dataclass
class OptimConfig:
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    head_keys: list[str] = field(default_factory=lambda: ["head"])
    no_decay_keys: list[str] = field(default_factory=lambda: ["norm", "pos_block"])
    norm_layers_no_decay: bool = True
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    # loss.name = "blda" (blda_tools.training.blda_loss); defaults are the paper's (Sec. 4.1).
    blda_mode: str = "ola+cde"
    blda_components: int = 5
    blda_em_steps: int = 3
    blda_momentum: float = 0.99
    blda_momentum_warmup: int = 1500
    blda_min_samples: int = 100
    blda_max_samples_per_cell: int = 1000
    blda_anchor_sampling: str = "pixels"
    blda_anchor_max_samples: int = 65536
    blda_mixed_updates_source: bool = False
    blda_eps: float = 0.01
    blda_tau: float = 0.1
    blda_lambda: float = 0.2
    blda_regression_loss: str = "l2"
    blda_plot_interval: int = 4000


@dataclass
class EvaluationConfig:
    interval: int = 4000
    resize: list[int] = field(default_factory=lambda: [512, 1024])
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    stride: list[int] = field(default_factory=lambda: [512, 1024])
    max_images: int = 0
    classes: list[int] = field(default_factory=list)


@dataclass
class TrainingConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    hrda: HRDAConfig = field(default_factory=HRDAConfig)
    mic: MICConfig = field(default_factory=MICConfig)
    rcs: RareClassSamplingConfig = field(default_factory=RareClassSamplingConfig)
    feature_distance: FeatureDistanceConfig = field(default_factory=FeatureDistanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


KEY_DOCS: dict[str, str] = {
    "run.seed": "seed of every random stream (data, augmentation, mixing, model init)",
    "run.iterations": "optimizer steps in the whole run (the poly schedule ends here)",
    "run.batch_size": "source images (and as many target images) per process and micro-batch",
    "run.accumulate": "micro-batches whose gradients are summed before each optimizer step",
    "run.device": "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'",
    "run.amp": "'none', 'bf16' or 'fp16' autocast; CUDA only",
    "run.num_workers": "DataLoader worker processes per training process",
    "run.log_interval": "iterations between log.jsonl records and live-view updates",
    "run.checkpoint_interval": "iterations between checkpoints/latest.pth writes",
    "run.live": "show progress: a live view on a terminal, plain lines otherwise",
    "model.arch": "architecture name for blda_tools.models.create_model",
    "model.backbone_weights": "ImageNet encoder weights, e.g. SegFormer's mit_b5.pth ('' = none)",
    "model.pretrained": "checkpoint of the whole model to start from ('' = none)",
    "model.trust_checkpoint": "allow full pickle loads of the weight files named here (unsafe)",
    "data.root": "prefix for relative source_root/target_root ('' = working directory)",
    "data.source": "source dataset name for blda_tools.datasets.build_dataset",
    "data.source_root": "source dataset root (relative to data.root)",
    "data.source_split": "source split: 'all' or a list file (GTA5 / SYNTHIA have no official split)",
    "data.source_size": "[height, width] source images are resized to before random rescale",
    "data.target": "target dataset name",
    "data.target_root": "target dataset root (relative to data.root)",
    "data.target_split": "target split used for self-training (labels not read)",
    "data.target_size": "[height, width] target images are resized to before random rescale",
    "data.val_split": "target split used for evaluation",
    "augment.crop_size": "[height, width] of training crops",
    "augment.scale_range": "[low, high] random rescale ratio after the base resize ([1, 1] = DAFormer's fixed resize)",
    "augment.flip": "random horizontal flip with probability 0.5",
    "augment.cat_max_ratio": "resample a crop (up to 10 times) while one class covers more (1 = off)",
    "augment.color_jitter_strength": "DACS colour jitter strength s (brightness/contrast/saturation/hue)",
    "augment.color_jitter_probability": "jitter is applied when a uniform draw exceeds this (DACS)",
    "augment.blur": "DACS Gaussian blur of the mixed image (half of the time)",
    "self_training.enabled": "false = source-only training",
    "self_training.ema_alpha": "EMA teacher momentum alpha (ramped as min(1 - 1/(it+1), alpha))",
    "self_training.pseudo_threshold": "teacher softmax confidence at or above which a pixel is confident",
    "self_training.ignore_top_rows": "pseudo-label weight zeroed on this many top crop rows",
    "self_training.ignore_bottom_rows": "pseudo-label weight zeroed on this many bottom crop rows",
    "self_training.mix": "'class' (ClassMix) or 'none' (train on the target crop itself)",
    "self_training.pseudo_weight_pooling": "pseudo-label weight: 'batch' (one per process batch, DAFormer) or 'image'",
    "self_training.crop_pseudo_margins": "[top, bottom, left, right] pixels of the full target frame with pseudo-label weight 0, cropped with the image ([] = off; HRDA: [30, 240, 30, 30])",
    "hrda.detail_crop_size": "[height, width] of HRDA's full-resolution detail crop (training) and detail slide window",
    "hrda.crop_coord_divisible": "the detail crop's offsets in the training crop are multiples of this",
    "hrda.detail_loss_weight": "weight of the detail-crop loss; the fused loss has 1 - weight",
    "mic.enabled": "MIC: an extra pass on the target crop, block-masked, against the teacher's pseudo-labels",
    "mic.mask_block_size": "side in pixels of MIC's square mask blocks",
    "mic.mask_ratio": "a mask block is dropped where a uniform draw is at most this (0.7 drops 70 %)",
    "mic.loss_weight": "weight of the masked pass's loss (MIC's mask_lambda)",
    "rcs.enabled": "Rare Class Sampling of source images",
    "rcs.temperature": "class temperature T of the sampling softmax",
    "rcs.min_pixels": "an image is eligible for class c when it has more pixels of c than this",
    "rcs.min_crop_ratio": "crop resampled (up to 10 times) until it holds min_pixels x ratio",
    "feature_distance.enabled": "thing-class ImageNet feature distance (needs imagenet_weights)",
    "feature_distance.weight": "lambda of the feature distance loss",
    "feature_distance.classes": "class ids whose pixels the distance is measured on",
    "feature_distance.scale_min_ratio": "label downscaling keeps a cell when its class covers this",
    "feature_distance.imagenet_weights": "checkpoint of the ImageNet-pretrained model or encoder",
    "optim.lr": "AdamW learning rate of the encoder",
    "optim.head_lr_mult": "learning-rate multiplier of parameters whose name holds a head key",
    "optim.weight_decay": "AdamW weight decay",
    "optim.betas": "AdamW betas",
    "optim.head_keys": "parameter-name substrings of the decode head",
    "optim.no_decay_keys": "parameter-name substrings without weight decay",
    "optim.norm_layers_no_decay": "no weight decay on any normalisation layer, whatever its name (DAFormer: false)",
    "optim.warmup_iters": "linear warm-up iterations",
    "optim.warmup_ratio": "learning-rate factor at iteration 0 of the warm-up",
    "optim.poly_power": "power of the polynomial decay",
    "optim.min_lr": "learning rate the polynomial decay ends at",
    "loss.name": "per-pixel loss: 'cross_entropy' or 'blda' (others: register_loss)",
    "loss.blda_mode": "Table 4 row: 'none' (weighted CE), 'ola_source', 'ola' or 'ola+cde'",
    "loss.blda_components": "K, Gaussian components per logit-set mixture",
    "loss.blda_em_steps": "T, EM steps per iteration from the previous estimate",
    "loss.blda_momentum": "m of the momentum update phi <- (1 - m^n) phi_new + m^n phi_old",
    "loss.blda_momentum_warmup": "m ramps linearly from 0 over a set's first N updates (0 = off)",
    "loss.blda_min_samples": "N_min, pixels a class needs in a batch to update its row (paper 100, release 500)",
    "loss.blda_max_samples_per_cell": "cap on samples per cell and update, for speed (0 = uncapped)",
    "loss.blda_anchor_sampling": "'pixels' (every labelled source pixel, released) or 'class_balanced'",
    "loss.blda_anchor_max_samples": "uniform pixel subsample of the 'pixels' anchors (0 = every pixel)",
    "loss.blda_mixed_updates_source": "the mixed image's weight-1 pixels also update source GMMs and anchors",
    "loss.blda_eps": "clamp of the anchor inverse CDF to [eps, 1 - eps] (Eq. 6)",
    "loss.blda_tau": "tau, scale of the logit offsets in Eq. 9",
    "loss.blda_lambda": "lambda, weight of the CDF regression loss (Eq. 10; 'ola+cde' only)",
    "loss.blda_regression_loss": "'l2' (paper) or 'l1' (release) regression loss",
    "loss.blda_plot_interval": "iterations between GMM-fit plots and JS divergences (0 = off)",
    "evaluation.interval": "iterations between target-val evaluations (0 = only at the end)",
    "evaluation.resize": "[height, width] val images are resized to ([] = keep)",
    "evaluation.crop_size": "[height, width] of sliding-window crops (the resized image = whole)",
    "evaluation.stride": "[height, width] sliding-window stride",
    "evaluation.max_images": "evaluate on the first N val images only (0 = all)",
    "evaluation.classes": "class ids mIoU / mAcc average over ([] = all; SYNTHIA: 16 classes)",
}
