"""fastmim-ds: FastMIM / MixMIM masked image modeling pre-training on DeepSpeed + FFCV."""
__version__ = "0.1.0"

__all__ = ["inference_model"]


def __getattr__(name: str):
    # lazy (PEP 562): `import fastmim_ds` and the CLI stay free of timm/torch imports until inference is asked for
    if name == "inference_model":
        from .inference import inference_model

        return inference_model
    raise AttributeError(f"module 'fastmim_ds' has no attribute {name!r}")
