"""The run configuration: one dataclass, filled from a YAML file and/or the diffusers scripts' flags.

Flag names and meanings are those of diffusers' `train_text_to_image.py` (and its Flax twin), so
their command lines run unchanged; `--config FILE.yaml` holds the same keys, and flags given on
the command line override the file. `validate()` checks the whole config before anything is
downloaded or compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from typing import Optional

from sdjax.errors import ConfigError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
INTERPOLATION_MODES = ("lanczos", "bicubic", "bilinear", "nearest", "box", "hamming")


TASKS = ("text_to_image", "dreambooth")
LORA_FORMATS = ("diffusers", "kohya", "both")
# Flags that only mean something to the LoRA commands.
LORA_FLAGS = ("rank", "lora_alpha", "lora_dropout", "lora_layers", "lora_init",
              "save_lora_format", "resume_lora")
PRIOR_GENERATION_PRECISION = ("no", "fp32", "fp16", "bf16")
@dataclasses.dataclass
class TrainConfig:
    # What is trained: the command (text_to_image, dreambooth) and the components
    task: str = "text_to_image"
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = None
    pre_compute_text_embeddings: bool = False
    # LoRA (the text_to_image_lora and dreambooth_lora commands set use_lora); None: the default
    use_lora: bool = False
    rank: Optional[int] = None              # 4
    lora_alpha: Optional[float] = None      # the rank (scale 1.0), as diffusers
    lora_dropout: Optional[float] = None    # 0.0
    lora_layers: Optional[str] = None       # attention (sdjax.lora.targets)
    lora_init: Optional[str] = None         # gaussian, as diffusers' LoRA scripts ask PEFT
    save_lora_format: Optional[str] = None  # diffusers
    resume_lora: Optional[str] = None       # a LoRA file the adapters start from
    lora: Optional[list] = None             # LoRA files fused into the base model: FILE[:SCALE]
    # Model
    pretrained_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    prediction_type: Optional[str] = None
    tokenizer_name: Optional[str] = None
    pretrained_vae_name_or_path: Optional[str] = None
    original_config: Optional[str] = None
    # DreamBooth (the dreambooth command)
    instance_data_dir: Optional[str] = None
    instance_prompt: Optional[str] = None
    class_data_dir: Optional[str] = None
    class_prompt: Optional[str] = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    class_num_inference_steps: int = 50
    prior_generation_precision: Optional[str] = None
    # Data
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    train_data_dir: Optional[str] = None
    tfds_data_dir: Optional[str] = None
    streaming: bool = False
    shuffle_buffer_size: int = 1000
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: Optional[int] = None
    cache_dir: Optional[str] = None
    caption_extension: Optional[str] = None
    allow_empty_captions: bool = False
    caption_dropout_probability: float = 0.0
    max_bad_images: Optional[int] = None
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    image_interpolation_mode: str = "lanczos"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    dataloader_num_workers: int = 0
    cache_latents: bool = False
    latent_cache_dir: Optional[str] = None
    rebuild_cache: bool = False
    # Batch and schedule
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: Optional[int] = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # Loss
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    offset_noise: bool = False
    input_perturbation: float = 0.0
    # Precision and EMA
    mixed_precision: Optional[str] = None
    frozen_dtype: Optional[str] = None      # of the frozen weights; default the compute dtype
    use_ema: bool = False
    # Output, logging, checkpoints
    output_dir: str = "sd-model-finetuned"
    logging_dir: str = "logs"
    report_to: str = "tensorboard"
    tracker_project_name: str = "text2image-fine-tune"
    logging_steps: int = 10
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    seed: Optional[int] = None
    # Validation images
    validation_prompts: Optional[list] = None
    validation_prompt: Optional[str] = None
    validation_steps: Optional[int] = None
    validation_epochs: Optional[int] = None
    num_validation_images: int = 4
    validation_num_inference_steps: int = 30
    validation_guidance_scale: float = 7.5
    validation_scheduler: Optional[str] = None
    # JAX specifics
    compile_only: bool = False              # compile the step, report memory and FLOPs, stop
    topology: Optional[str] = None          # a TPU slice to compile for (v5e-8, v5e:2x4, ...)
    fsdp: Optional[int] = None              # devices an fsdp group splits the state over
    sharding: Optional[str] = None          # replicated | zero1 | zero3 (sdjax.train.state)
    attention_implementation: Optional[str] = "auto"  # auto | xla | cudnn | flash (attention.py)
    gradient_checkpointing_policy: Optional[str] = None  # implies --gradient_checkpointing
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    distributed_timeout: int = 300

    # ---------------------------------------------------------------------------------------

    @property
    def remat(self) -> bool:
        """Whether the models' blocks are remat'd: --gradient_checkpointing, or a policy given."""
        return self.gradient_checkpointing or self.gradient_checkpointing_policy is not None

    @property
    def remat_policy(self) -> str:
        """JAX's name of the policy (sdjax.models.layers.REMAT_POLICIES); nothing_saveable unless
        --gradient_checkpointing_policy says otherwise."""
        from sdjax.models.layers import remat_policy_name

        return remat_policy_name(self.gradient_checkpointing_policy or "nothing")

    @property
    def compute_dtype_name(self) -> str:
        """bf16 for both 'bf16' and 'fp16' (docs/training.md: fp16 runs as bf16), else float32."""
        return "bfloat16" if self.mixed_precision in ("fp16", "bf16") else "float32"

    @property
    def frozen_dtype_name(self) -> str:
        """The frozen weights' dtype: --frozen_dtype, else the compute dtype (as diffusers
        keeps frozen models in the weight dtype)."""
        return {"bf16": "bfloat16", "fp32": "float32"}.get(self.frozen_dtype,
                                                            self.compute_dtype_name)

    @property
    def sharding_strategy(self) -> str:
        """--sharding, else zero3 when --fsdp splits the state, else replicated."""
        if self.sharding:
            return self.sharding
        return "zero3" if (self.fsdp or 1) > 1 else "replicated"

    @property
    def trained_components(self) -> list:
        return ["unet"] + (["text_encoder"] if self.train_text_encoder else [])

    @property
    def lora_rank(self) -> int:
        return 4 if self.rank is None else self.rank

    @property
    def lora_scale(self) -> float:
        """alpha / rank: the factor of every adapter's output."""
        alpha = self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.lora_rank

    @property
    def effective_noise_offset(self) -> float:
        """--noise_offset, or DreamBooth's --offset_noise (diffusers adds 0.1 x per-channel noise)."""
        return self.noise_offset or (0.1 if self.offset_noise else 0.0)

    @property
    def prior_preservation(self) -> bool:
        return self.task == "dreambooth" and self.with_prior_preservation

    @property
    def run_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    @property
    def all_validation_prompts(self) -> list:
        """--validation_prompts (train_text_to_image.py) and --validation_prompt (the LoRA and
        DreamBooth scripts) together."""
        return list(self.validation_prompts or []) + (
            [self.validation_prompt] if self.validation_prompt else [])

    def validate(self) -> "TrainConfig":
        problems = []
        if not self.pretrained_model_name_or_path:
            problems.append("--pretrained_model_name_or_path is required (a diffusers folder, a "
                            "hub id, a single-file checkpoint, or a shipped config name such as "
                            "'tiny')")
        problems += self._original_config_problems()
        if self.task not in TASKS:
            problems.append(f"--task={self.task!r}: choose one of {', '.join(TASKS)}")
        elif self.task == "dreambooth":
            problems += self._dreambooth_problems()
            if self.tracker_project_name == "text2image-fine-tune":  # diffusers' name per script
                self.tracker_project_name = "dreambooth-lora" if self.use_lora else "dreambooth"
        else:
            if not self.dataset_name and not self.train_data_dir:
                problems.append("give --dataset_name or --train_data_dir")
            given = [f for f in ("instance_data_dir", "instance_prompt", "with_prior_preservation")
                     if getattr(self, f)]
            if given:
                problems.append(f"--{given[0]} is a DreamBooth flag: run `python train_flax.py "
                                "dreambooth ...`")
        problems += self._text_encoder_problems()
        problems += self._lora_problems()
        if self.resolution <= 0 or self.resolution % 8:
            problems.append(f"--resolution={self.resolution} must be a positive multiple of 8 "
                            "(the VAE downsamples by 8)")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "checkpointing_steps", "logging_steps"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            problems.append("--max_train_steps must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            problems.append("--checkpoints_total_limit must be at least 1")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"--lr_scheduler={self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
        from sdjax.train.state import SHARDINGS

        if self.sharding not in (None,) + SHARDINGS:
            problems.append(f"--sharding={self.sharding!r}: choose one of {', '.join(SHARDINGS)}")
        elif self.fsdp is not None and self.fsdp < 1:
            problems.append("--fsdp must be at least 1")
        elif self.sharding == "replicated" and (self.fsdp or 1) > 1:
            problems.append(f"--sharding replicated keeps everything on every device: drop "
                            f"--fsdp {self.fsdp} (or choose zero1 or zero3)")
        if self.gradient_checkpointing_policy is not None:
            try:
                self.remat_policy
            except ConfigError as e:
                problems.append(f"--gradient_checkpointing_policy: {e}")
        if self.topology and not self.compile_only:
            problems.append("--topology compiles for a TPU slice you are not on: add "
                            "--compile_only")
        if self.frozen_dtype not in (None, "bf16", "fp32"):
            problems.append(f"--frozen_dtype={self.frozen_dtype!r}: choose bf16 or fp32")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"--mixed_precision={self.mixed_precision!r}: choose no, fp16 or bf16")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            problems.append(f"--prediction_type={self.prediction_type!r}: choose epsilon or v_prediction")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append("--snr_gamma must be positive (5.0 is the recommended value)")
        if not 0.0 <= self.caption_dropout_probability <= 1.0:
            problems.append("--caption_dropout_probability must be between 0 and 1")
        if self.image_interpolation_mode not in INTERPOLATION_MODES:
            problems.append(f"--image_interpolation_mode={self.image_interpolation_mode!r}: choose "
                            f"one of {', '.join(INTERPOLATION_MODES)}")
        if self.max_bad_images is not None and self.max_bad_images < 0:
            problems.append("--max_bad_images must be 0 or more")
        if self.learning_rate <= 0:
            problems.append("--learning_rate must be positive")
        if self.report_to not in ("tensorboard", "wandb", "none", "all"):
            problems.append(f"--report_to={self.report_to!r}: choose tensorboard, wandb or none")
        if self.attention_implementation not in ("auto", "xla", "cudnn", "flash", None):
            problems.append(f"--attention_implementation={self.attention_implementation!r}: "
                            "choose auto, xla, cudnn or flash")
        if self.train_data_dir and not os.path.isdir(self.train_data_dir):
            problems.append(f"--train_data_dir {self.train_data_dir} is not a directory")
        if self.resume_from_checkpoint is not None:
            from sdjax.checkpoints import parse_ref

            try:
                parse_ref(self.resume_from_checkpoint)
            except ConfigError as e:
                problems.append(str(e))
        if self.distributed_timeout < 1:
            problems.append("--distributed_timeout must be at least 1 (seconds)")
        if not self.tracker_project_name.strip():
            problems.append("--tracker_project_name must not be empty")
        if self.streaming:
            if self.max_train_steps is None:
                problems.append("--streaming needs --max_train_steps (a stream's length is unknown)")
            for flag in ("enable_bucket", "cache_latents", "max_train_samples"):
                if getattr(self, flag):
                    problems.append(f"--{flag} needs random access to the data set: not with "
                                    "--streaming")
            if self.dataset_name and self.dataset_name.startswith("tfds:"):
                problems.append("tfds: data sets are read with random access: drop --streaming")
            if self.shuffle_buffer_size < 1:
                problems.append("--shuffle_buffer_size must be at least 1")
        if self.cache_latents and "://" in (self.latent_cache_dir or self.output_dir):
            problems.append("the latent cache is read as memory-mapped local files and cannot "
                            f"live at {self.latent_cache_dir or self.output_dir}: give a local "
                            "--latent_cache_dir (a disk or a mounted bucket)")
        if self.latent_cache_dir and os.path.exists(self.latent_cache_dir) and not os.path.isdir(
                self.latent_cache_dir):
            problems.append(f"--latent_cache_dir {self.latent_cache_dir} exists and is not a directory")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            problems.append(f"--output_dir {self.output_dir} exists and is not a directory")
        problems += self._validation_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def _original_config_problems(self) -> list:
        if not self.original_config:
            return []
        if not os.path.exists(os.path.expanduser(self.original_config)):
            return [f"--original_config {self.original_config} does not exist (give the single "
                    "file's LDM yaml or a diffusers folder describing it)"]
        model = self.pretrained_model_name_or_path
        if model and not os.path.isfile(os.path.expanduser(model)):
            return [f"--original_config describes a single-file checkpoint, but "
                    f"--pretrained_model_name_or_path {model} is not a file: drop "
                    "--original_config"]
        return []

    def _text_encoder_problems(self) -> list:
        problems = []
        if self.train_text_encoder and self.pre_compute_text_embeddings:
            problems.append("--train_text_encoder needs the text encoder at every step: drop "
                            "--pre_compute_text_embeddings")
        if self.text_encoder_lr is not None:
            if self.text_encoder_lr <= 0:
                problems.append("--text_encoder_lr must be positive")
            elif not self.train_text_encoder:
                problems.append("--text_encoder_lr sets the text encoder's learning rate: add "
                                "--train_text_encoder")
        if self.pre_compute_text_embeddings and self.streaming:
            problems.append("--pre_compute_text_embeddings needs every caption up front: not with "
                            "--streaming")
        if self.pre_compute_text_embeddings and self.cache_latents:
            problems.append("--cache_latents already caches the text embeddings: drop "
                            "--pre_compute_text_embeddings")
        return problems

    def _lora_problems(self) -> list:
        problems = []
        given = [f for f in LORA_FLAGS if getattr(self, f) is not None]
        if not self.use_lora:
            if given:
                problems.append(f"--{given[0]} is a LoRA flag: run `python train_flax.py "
                                f"{self.task}_lora ...`")
            return problems
        if self.lora_rank < 1:
            problems.append(f"--rank={self.rank} must be at least 1")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            problems.append("--lora_alpha must be positive")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            problems.append("--lora_dropout must be at least 0 and below 1")
        from sdjax.lora.adapters import LORA_INITS

        if self.lora_init is not None and self.lora_init not in LORA_INITS:
            problems.append(f"--lora_init={self.lora_init!r}: choose {' or '.join(LORA_INITS)}")
        if self.save_lora_format not in (None,) + LORA_FORMATS:
            problems.append(f"--save_lora_format={self.save_lora_format!r}: choose one of "
                            f"{', '.join(LORA_FORMATS)}")
        try:
            from sdjax.lora.targets import layer_names

            layer_names(self.lora_layers)
        except ConfigError as e:
            problems.append(str(e))
        if self.resume_lora and not os.path.exists(self.resume_lora):
            problems.append(f"--resume_lora {self.resume_lora} does not exist")
        return problems

    def _dreambooth_problems(self) -> list:
        problems = []
        for flag in ("dataset_name", "train_data_dir"):
            if getattr(self, flag):
                problems.append(f"dreambooth reads --instance_data_dir (and --class_data_dir), "
                                f"not --{flag}")
        if not self.instance_data_dir:
            problems.append("dreambooth needs --instance_data_dir (a folder of the subject's images)")
        elif not os.path.isdir(self.instance_data_dir):
            problems.append(f"--instance_data_dir {self.instance_data_dir} is not a directory")
        if not (self.instance_prompt or "").strip():
            problems.append("dreambooth needs --instance_prompt (e.g. \"a photo of sks dog\")")
        for flag in ("streaming", "enable_bucket", "cache_latents"):
            if getattr(self, flag):
                problems.append(f"--{flag} is not available with dreambooth (a handful of images)")
        if self.prior_loss_weight < 0:
            problems.append("--prior_loss_weight must be 0 or more")
        if self.prior_generation_precision not in (None,) + PRIOR_GENERATION_PRECISION:
            problems.append(f"--prior_generation_precision={self.prior_generation_precision!r}: "
                            f"choose one of {', '.join(PRIOR_GENERATION_PRECISION)}")
        if not self.with_prior_preservation:
            return problems
        if not self.class_data_dir:
            problems.append("--with_prior_preservation needs --class_data_dir (a folder for the "
                            "class images; missing ones are generated)")
        if not (self.class_prompt or "").strip():
            problems.append("--with_prior_preservation needs --class_prompt (e.g. \"a photo of dog\")")
        for flag in ("num_class_images", "sample_batch_size", "class_num_inference_steps"):
            if getattr(self, flag) < 1:
                problems.append(f"--{flag} must be at least 1")
        if self.class_data_dir and self.instance_data_dir:
            instance = os.path.realpath(self.instance_data_dir)
            classes = os.path.realpath(self.class_data_dir)
            if classes == instance or classes.startswith(instance + os.sep):
                problems.append(f"--class_data_dir {self.class_data_dir} is inside "
                                f"--instance_data_dir {self.instance_data_dir}: class images would "
                                "be read as the subject's; give it a folder of its own")
            elif os.path.exists(self.class_data_dir) and not os.path.isdir(self.class_data_dir):
                problems.append(f"--class_data_dir {self.class_data_dir} is not a directory")
        return problems

    @property
    def ignored_dreambooth_flags(self) -> list:
        """diffusers warns when class flags come without --with_prior_preservation; so do we."""
        if self.task != "dreambooth" or self.with_prior_preservation:
            return []
        return [f"--{f}" for f in ("class_data_dir", "class_prompt") if getattr(self, f)]

    def _validation_problems(self) -> list:
        problems = []
        prompts = self.all_validation_prompts
        if not prompts:
            for flag in ("validation_steps", "validation_epochs"):
                if getattr(self, flag) is not None:
                    problems.append(f"--{flag} needs prompts: add --validation_prompts P1 P2 ...")
            return problems
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            problems.append("--validation_prompts holds an empty prompt")
        if self.validation_steps is not None and self.validation_epochs is not None:
            problems.append("give --validation_steps or --validation_epochs, not both")
        for flag in ("validation_steps", "validation_epochs", "num_validation_images",
                     "validation_num_inference_steps"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                problems.append(f"--{flag} must be at least 1")
        if self.validation_epochs is not None and self.streaming:
            problems.append("--validation_epochs needs the epoch length, which a stream does not "
                            "have: use --validation_steps")
        if self.validation_scheduler is not None:
            from sdjax.sampling.schedulers import sampler_name

            try:
                self.validation_scheduler = sampler_name(self.validation_scheduler,
                                                         "--validation_scheduler")
            except ConfigError as e:
                problems.append(str(e))
        return problems


# Flags of the diffusers scripts that mean nothing here: accepted, with a one-line note.
NOOP_FLAGS = {
    "enable_xformers_memory_efficient_attention":
        "xFormers is PyTorch-only; --attention_implementation auto fuses it (cuDNN, TPU flash)",
    "allow_tf32": "TF32 is a PyTorch/CUDA setting; JAX chooses matmul precision itself",
    "use_8bit_adam": "8-bit Adam (bitsandbytes) is PyTorch-only; optax AdamW is used",
    "foreach_ema": "EMA is one fused update inside the jitted step",
    "offload_ema": "EMA lives sharded with the parameters on the devices",
    "non_ema_revision": "not used: the non-EMA weights are the ones loaded",
    "local_rank": "processes are started per host; see --coordinator_address",
    "push_to_hub": "not supported yet: upload output_dir with `huggingface-cli upload`",
    "hub_token": "not supported yet", "hub_model_id": "not supported yet",
    "set_grads_to_none": "gradients are values inside the jitted step, never kept between steps",
    "dream_training": None, "dream_detail_preservation": None,
    "class_labels_conditioning": None, "validation_images": None,
    "text_encoder_use_attention_mask": None, "skip_save_text_encoder": None,
}
# Of those, the ones taking a value (the rest are store_true switches).
_NOOP_WITH_VALUE = {"non_ema_revision", "local_rank", "hub_token",
                    "hub_model_id", "dream_detail_preservation", "class_labels_conditioning",
                    "validation_images"}


def _field_type(field: dataclasses.Field):
    t = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    for name, py in (("list", list), ("bool", bool), ("int", int), ("float", float)):
        if re.search(rf"\b{name}\b", t):
            return py
    return str


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The training flags, in `sdjax.flag_help`'s sections, each with its help and default.
    Without a command (`python train_flax.py --help`) the description lists every command."""
    from sdjax.flag_help import COMMANDS, HELP, SECTIONS

    if command is None:
        description = ("Fine-tune Stable Diffusion with JAX: `accelerate launch train_X.py <flags>` "
                       "becomes `python train_flax.py X <flags>`.\n\ncommands:\n"
                       + "".join(f"  {name:<20}{text}\n" for name, text in COMMANDS)
                       + "\nThe flags of the training commands (diffusers' names; --config "
                         "FILE.yaml holds the same keys):")
    else:
        description = (f"{dict(COMMANDS).get(command, 'train')}. Flags: diffusers' names; "
                       "--config FILE.yaml holds the same keys.")
    parser = argparse.ArgumentParser(
        prog=f"train_flax.py{'' if command is None else ' ' + command}",
        usage=f"train_flax.py {command or '[COMMAND]'} [--FLAG VALUE ...] [--config FILE.yaml]",
        argument_default=argparse.SUPPRESS, allow_abbrev=False, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the flags below as keys")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for title, section in SECTIONS:
        group = parser.add_argument_group(title)
        for name in section:
            _add_flag(group, fields[name], HELP[name])
    for name in NOOP_FLAGS:
        if name in _NOOP_WITH_VALUE:
            parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{name}", nargs="?", const=True, help=argparse.SUPPRESS)
    return parser


def _add_flag(group, field: dataclasses.Field, text: str) -> None:
    kind = _field_type(field)
    flag = f"--{field.name}"
    if field.default not in (None, False, dataclasses.MISSING) and "default" not in text:
        text = f"{text} (default {field.default})"
    if kind is bool:
        # `--use_ema` as in diffusers; `--use_ema=false` to switch off what a file set.
        group.add_argument(flag, nargs="?", const=True, type=_bool, metavar="BOOL", help=text)
    elif kind is list:
        group.add_argument(flag, nargs="+", metavar="VALUE", help=text)
    else:
        metavar = {int: "N", float: "X"}.get(kind, "VALUE")
        group.add_argument(flag, type=kind, metavar=metavar, help=text)


def _suggest(unknown: str, valid: list) -> str:
    name = unknown.split("=", 1)[0].lstrip("-")
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean --{close[0]}?)" if close else ""


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
    return data


def parse_train_args(argv: list, task: Optional[str] = None, lora: bool = False,
                     command: Optional[str] = None) -> tuple:
    """-> (TrainConfig, notes). Unknown flags raise ConfigError naming the closest valid one.
    `task` is the command's (text_to_image, dreambooth), `lora` whether it trains LoRA
    adapters (the *_lora commands); a config file may name both too. `command` names the
    command in --help (None: the top-level help, which lists the commands)."""
    parser = build_parser(command)
    valid = [f.name for f in dataclasses.fields(TrainConfig)] + ["config"]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise ConfigError(f"unknown flag {flag}{_suggest(flag, valid)}; "
                          "see `python train_flax.py --help`")
    given = vars(args)
    values = {}
    if "config" in given:
        # Paths in the file are relative to the working directory, like those of flags.
        values.update(_read_yaml(given.pop("config")))
    notes = []
    for name in list(given) + [k for k in list(values) if k in NOOP_FLAGS]:
        if name in NOOP_FLAGS:
            value = given.pop(name, values.pop(name, None))
            reason = NOOP_FLAGS[name]
            if reason is None:
                raise ConfigError(f"--{name} is not supported by sdjax")
            if value not in (None, False):
                notes.append(f"--{name}: ignored ({reason})")
    values.update(given)
    if task is not None and task != "text_to_image":
        values["task"] = task
    if lora:
        values["use_lora"] = True
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = [k for k in values if k not in fields]
    if bad:
        raise ConfigError(f"unknown key {bad[0]!r} in the config file{_suggest(bad[0], valid)}")
    try:
        config = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"invalid config: {e}") from None
    _check_types(config)
    return config, notes


def _check_types(config: TrainConfig) -> None:
    """YAML values arrive untyped: coerce numbers, reject what cannot be coerced."""
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        if value is None:
            continue
        kind = _field_type(field)
        try:
            if kind is bool and not isinstance(value, bool):
                value = _bool(str(value))
            elif kind in (int, float) and not isinstance(value, bool):
                value = kind(value)
                if kind is int and float(getattr(config, field.name)) != value:
                    raise ValueError
            elif kind is str:
                value = str(value)
            elif kind is list:
                value = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise ConfigError(f"{field.name}: expected {kind.__name__}, got {value!r}") from None
        setattr(config, field.name, value)


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
