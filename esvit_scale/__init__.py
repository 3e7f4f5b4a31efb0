"""esvit_scale: EsViT self-supervised Swin pretraining at scale (DeepSpeed ZeRO, fused kernels, DALI)."""
__version__ = "0.1.0"
