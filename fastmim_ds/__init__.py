"""fastmim-ds: FastMIM / MixMIM masked image modeling pre-training on DeepSpeed + FFCV."""
__version__ = "0.1.0"
