"""fastmim-ds: masked image modeling pre-training (FastMIM, MixMIM, MAE, SimMIM) on DeepSpeed + FFCV.

Importing the package registers the backbones it defines in timm (``mixmim_base``, ...; :mod:`fastmim_ds.models`),
so ``import fastmim_ds; timm.create_model("mixmim_base")`` works. timm (and torch) load only when used: if timm is
imported already, the models are registered at once; otherwise right after timm's own import, so the command line
starts without them.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

__all__ = ["inference_model"]


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Import hook: when ``timm`` is first imported, runs its import, then imports :mod:`fastmim_ds.models`."""

    def find_spec(self, name, path, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; the other finders locate timm
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            importlib.import_module(f"{__name__}.models")

        spec.loader.exec_module = exec_module
        return spec


def _register_backbones() -> None:
    if "timm" in sys.modules:
        importlib.import_module(f"{__name__}.models")
    elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


_register_backbones()


def __getattr__(name: str):
    # lazy (PEP 562): `import fastmim_ds` and the CLI stay free of timm/torch imports until inference is asked for
    if name == "inference_model":
        from .inference import inference_model

        return inference_model
    raise AttributeError(f"module 'fastmim_ds' has no attribute {name!r}")
