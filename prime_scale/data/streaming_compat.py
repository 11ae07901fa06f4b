"""Import mosaicml-streaming on machines where torchvision is broken.

`streaming/__init__.py` imports its vision datasets, which import torchvision. On a CPU torch with
the CUDA torchvision wheel that pip resolves, `import torchvision` raises ("operator
torchvision::nms does not exist"), so `import streaming` fails although prime-scale needs none of
its vision code. Only in that case we register a minimal stand-in torchvision before importing
streaming. The stand-in has real module specs because transformers (imported by streaming's text
datasets) probes it with importlib.util.find_spec. When the real torchvision imports, it is used.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

_STANDIN_FLAG = "__prime_scale_standin__"


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError (missing CUDA ops), ImportError, OSError (missing .so)
        return False
    return True


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    mod.__path__ = []
    setattr(mod, _STANDIN_FLAG, True)
    sys.modules[name] = mod
    return mod


def _install_torchvision_standin() -> None:
    # a failed import can leave half-initialised submodules behind; drop them all
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    tv = _module("torchvision")
    datasets = _module("torchvision.datasets")
    transforms = _module("torchvision.transforms")
    functional = _module("torchvision.transforms.functional")

    class VisionDataset:  # base class of streaming's vision datasets, never instantiated here
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is unavailable on this machine (prime-scale stand-in)")

    def to_tensor(*args, **kwargs):
        raise RuntimeError("torchvision is unavailable on this machine (prime-scale stand-in)")

    datasets.VisionDataset = VisionDataset
    functional.to_tensor = to_tensor
    tv.datasets, tv.transforms, transforms.functional = datasets, transforms, functional
    tv.__version__ = "0.0.0+prime-scale-standin"


def import_streaming() -> types.ModuleType:
    """Return the `streaming` package, installing the torchvision stand-in only if needed."""
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    if not _torchvision_works():
        _install_torchvision_standin()
    import streaming

    return streaming


def torchvision_is_standin() -> bool:
    mod = sys.modules.get("torchvision")
    return bool(mod is not None and getattr(mod, _STANDIN_FLAG, False))
