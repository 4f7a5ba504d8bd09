"""LoRA: low-rank adapters on the UNet and text encoder (training, files, fusing)."""
