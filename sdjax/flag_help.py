"""What each training flag means, one line each, grouped into the sections `--help` shows.

Every field of `sdjax.config.TrainConfig` is a flag (diffusers' script names where they have one)
and appears in exactly one section here (tests/test_config.py checks it). The commands'
one-line summaries are here too, for `python train_flax.py --help`.
"""

from __future__ import annotations

COMMANDS = (
    ("text_to_image", "train_text_to_image.py (the default): fine-tune on captioned images"),
    ("dreambooth", "train_dreambooth.py: a subject from a few images, with prior preservation"),
    ("text_to_image_lora", "train_text_to_image_lora.py: LoRA adapters on captioned images"),
    ("dreambooth_lora", "train_dreambooth_lora.py: DreamBooth with LoRA adapters"),
    ("cache", "encode the data set into the latent and text-embedding cache, then stop"),
    ("export", "a checkpoint as a diffusers pipeline or a single .safetensors file"),
    ("generate", "images from a model or a training checkpoint"),
    ("compare", "one grid with every checkpoint of a run side by side"),
    ("merge", "A1111's checkpoint merger: weighted sum or add difference"),
)

SECTIONS = (
    ("what is trained", {
        "task": "text_to_image or dreambooth (set by the command)",
        "train_text_encoder": "train the text encoder too",
        "text_encoder_lr": "the text encoder's learning rate (default: --learning_rate)",
        "pre_compute_text_embeddings": "encode every caption once and keep the frozen text "
                                       "encoder off the devices",
    }),
    ("LoRA (the *_lora commands)", {
        "use_lora": "train LoRA adapters (set by the *_lora commands)",
        "rank": "adapter rank (default 4)",
        "lora_alpha": "adapter alpha; the scale is alpha / rank (default: the rank)",
        "lora_dropout": "dropout on the adapters' input, in [0, 1) (default 0)",
        "lora_layers": "layers adapted: attention, transformer, locon or module names "
                       "(default attention)",
        "lora_init": "initialisation of the down matrix: gaussian or kaiming (default gaussian)",
        "save_lora_format": "LoRA files written: diffusers, kohya or both (default diffusers)",
        "resume_lora": "a LoRA file the adapters start from",
        "lora": "LoRA files fused into the base model first, FILE[:SCALE] (repeatable)",
    }),
    ("model", {
        "pretrained_model_name_or_path": "a diffusers folder or hub id, a single-file "
                                         "checkpoint, or a shipped config (tiny, sd15, sd21)",
        "revision": "the hub revision (branch, tag or commit) of the model",
        "variant": "the weights variant to read, e.g. fp16",
        "prediction_type": "train and sample as epsilon or v_prediction (default: the "
                           "scheduler's)",
        "tokenizer_name": "a tokenizer folder or hub id replacing the model's",
        "pretrained_vae_name_or_path": "a VAE folder or hub id replacing the model's",
        "original_config": "describes a non-standard single file: an LDM yaml or a diffusers "
                           "folder",
    }),
    ("DreamBooth (the dreambooth commands)", {
        "instance_data_dir": "the folder of the subject's images",
        "instance_prompt": "the caption of every instance image, e.g. 'a photo of sks dog'",
        "class_data_dir": "the folder of class images (missing ones are generated)",
        "class_prompt": "the caption of the class images, e.g. 'a photo of dog'",
        "with_prior_preservation": "add the class images' loss (prior preservation)",
        "prior_loss_weight": "the weight of the class images' loss",
        "num_class_images": "class images to use, generated first when missing",
        "sample_batch_size": "class images generated per device per call",
        "class_num_inference_steps": "sampler steps per generated class image",
        "prior_generation_precision": "dtype the class images are generated in: no, fp32, fp16 "
                                      "or bf16 (default: the compute dtype)",
    }),
    ("data", {
        "dataset_name": "a Hugging Face dataset (hub name or saved folder) or tfds:NAME",
        "dataset_config_name": "the dataset's configuration name",
        "train_data_dir": "a local folder: imagefolder with metadata.jsonl, or images with .txt "
                          "captions",
        "tfds_data_dir": "where TFDS keeps prepared data sets",
        "streaming": "read the dataset as a stream instead of downloading it whole",
        "shuffle_buffer_size": "samples shuffled together when streaming",
        "image_column": "the dataset's image column",
        "caption_column": "the dataset's caption column",
        "max_train_samples": "train on the first N samples only",
        "cache_dir": "where Hugging Face datasets caches downloads",
        "caption_extension": "the caption files' extension in a folder of images (e.g. .caption)",
        "allow_empty_captions": "train images without a caption on the empty caption",
        "caption_dropout_probability": "the share of samples trained with the empty caption",
        "max_bad_images": "unreadable images skipped before the run stops (default 1%%, or 100 "
                          "for a stream)",
        "resolution": "the side images are resized and cropped to",
        "center_crop": "crop the centre (else a random crop)",
        "random_flip": "flip images horizontally at random",
        "image_interpolation_mode": "resize filter: lanczos, bicubic, bilinear, nearest, box or "
                                    "hamming",
        "enable_bucket": "aspect-ratio buckets instead of square crops",
        "min_bucket_reso": "the smallest bucket side",
        "max_bucket_reso": "the largest bucket side",
        "bucket_reso_steps": "bucket sides are multiples of this",
        "dataloader_num_workers": "threads decoding images (0: four)",
        "cache_latents": "train from cached VAE latents (and text embeddings)",
        "latent_cache_dir": "the latent cache's folder (default output_dir/latent_cache)",
        "rebuild_cache": "rebuild the latent cache even if one fits",
    }),
    ("batch and optimizer", {
        "train_batch_size": "images per device per micro-batch",
        "num_train_epochs": "epochs to train when --max_train_steps is not given",
        "max_train_steps": "optimizer steps to train (overrides --num_train_epochs)",
        "gradient_accumulation_steps": "micro-batches per optimizer step",
        "gradient_checkpointing": "recompute activations in the backward pass (remat) to save "
                                  "memory",
        "learning_rate": "the peak learning rate",
        "scale_lr": "multiply the learning rate by the effective batch size",
        "lr_scheduler": "constant, constant_with_warmup, linear or cosine",
        "lr_warmup_steps": "steps of linear warm-up",
        "adam_beta1": "AdamW's beta1",
        "adam_beta2": "AdamW's beta2",
        "adam_weight_decay": "AdamW's weight decay",
        "adam_epsilon": "AdamW's epsilon",
        "max_grad_norm": "clip gradients to this global norm (0: no clipping)",
    }),
    ("loss", {
        "snr_gamma": "min-SNR loss weighting with this gamma (5.0 is the recommended value)",
        "noise_offset": "add this much per-channel offset noise",
        "offset_noise": "DreamBooth's offset noise: --noise_offset 0.1",
        "input_perturbation": "perturb the noise the latents are noised with by this much",
    }),
    ("precision and EMA", {
        "mixed_precision": "no, bf16 or fp16 (runs as bf16): the compute dtype",
        "frozen_dtype": "dtype of the frozen weights: fp32 or bf16 (default: the compute dtype)",
        "use_ema": "keep an exponential moving average of the trained weights",
    }),
    ("output, logging and checkpoints", {
        "output_dir": "where the pipeline (or LoRA), checkpoints/, logs/ and validation/ go "
                      "(a folder or gs://)",
        "logging_dir": "the TensorBoard folder inside --output_dir",
        "report_to": "tensorboard, wandb, all or none",
        "tracker_project_name": "the TensorBoard / wandb project name",
        "logging_steps": "log the loss and rates every N steps",
        "checkpointing_steps": "write an Orbax checkpoint every N steps",
        "checkpoints_total_limit": "keep at most N checkpoints of the line being trained",
        "resume_from_checkpoint": "latest, checkpoint-N, N or the path of a checkpoint folder",
        "seed": "the run's seed (data order, noise, initialisation)",
    }),
    ("validation images", {
        "validation_prompts": "prompts sampled while training (one or more)",
        "validation_prompt": "one validation prompt (diffusers' DreamBooth flag)",
        "validation_steps": "sample validation images every N steps",
        "validation_epochs": "sample validation images every N epochs",
        "num_validation_images": "images per validation prompt",
        "validation_num_inference_steps": "sampler steps per validation image",
        "validation_guidance_scale": "classifier-free guidance of the validation images",
        "validation_scheduler": "the validation sampler, by sdjax or diffusers class name "
                                "(default: the model's)",
    }),
    ("JAX: devices, hosts and memory", {
        "compile_only": "compile the step, report its memory and FLOPs, and stop",
        "topology": "a TPU slice to compile for without one (v5e-8, v5e:2x4, ...)",
        "fsdp": "devices one fsdp group splits the state over",
        "sharding": "how the state is laid out: replicated, zero1 or zero3",
        "attention_implementation": "auto, xla, cudnn or flash",
        "gradient_checkpointing_policy": "what remat keeps (implies --gradient_checkpointing), "
                                         "e.g. dots",
        "coordinator_address": "host:port of process 0, to start a multi-host job by hand",
        "num_processes": "processes (hosts) in the job; 1 forces a single process",
        "process_id": "this process's index in the job",
        "distributed_timeout": "seconds to wait for the other processes at start-up",
    }),
)

HELP = {name: text for _, section in SECTIONS for name, text in section.items()}
