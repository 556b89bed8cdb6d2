"""StepFlow: Step-Saliency diagnostics and StepFlow test-time repair for reasoning models.

See shared design (docs/method.md) for the equations. The compiled ops live in
`stepflow_ext._C` and are reachable as `torch.ops.stepflow.*`; `stepflow_ext.ops` wraps
them with argument checks.
"""
import torch  # noqa: F401  (loads libtorch before the extension)


def _torch_mismatch(built):
    """A clear error when _C was compiled against another torch than the one running."""
    return ImportError(
        f"stepflow_ext: its compiled extension (stepflow_ext._C) was built against torch {built}, but this "
        f"Python runs torch {torch.__version__}; rebuild it against the installed torch: "
        "`pip install --no-build-isolation .` in the StepFlow source tree, `make build` in a development "
        "checkout (README, Install)")


def _built_torch_version():
    """The torch version recorded in _C's binary (csrc/ops.cpp's build marker), read without loading it."""
    import importlib.util
    import re

    try:
        origin = importlib.util.find_spec(__name__ + "._C").origin
        with open(origin, "rb") as f:
            found = re.search(rb"stepflow-build-torch=([\x21-\x7e]+)", f.read())
    except (ImportError, AttributeError, TypeError, OSError):
        return None
    return found.group(1).decode() if found else None


try:
    from . import _C
except ImportError as _error:  # e.g. undefined symbols: _C was linked against another libtorch
    _built = _built_torch_version()
    if _built and _built != torch.__version__:
        raise _torch_mismatch(_built) from _error
    raise
if getattr(_C, "torch_version", torch.__version__) not in ("", torch.__version__):
    import os as _os

    if _os.environ.get("STEPFLOW_SKIP_TORCH_CHECK", "0") in ("", "0"):
        raise _torch_mismatch(_C.torch_version)

from . import ops, reference
from .ops import oeb_attention, step_momentum, step_momentum_decode_, step_saliency_pool
from .segment import Segmentation, StepTracker, id_sets_for, markers_for, segment
from . import saliency  # noqa: E402  (after segment: it imports Segmentation)
from .config import StepFlowConfig
from .intervention import StepFlowHandle, replace_attention
from .saliency import StepSaliencyResult, step_saliency



def load_default(device="cpu", dtype=None):
    """(model, tokenizer) of the embedded tiny reasoner (stepflow_ext/data/tiny_reasoner/), loaded
    offline: a ~1M-parameter Qwen2 model trained on variable-substitution chains
    (stepflow_ext.tiny.tasks). See README, "The embedded tiny reasoner"."""
    from .tiny.model import load_default as _load  # lazy: transformers is imported only here

    return _load(device=device, dtype=dtype)


__version__ = _C.__version__
cuda_compiled = _C.cuda_compiled

__all__ = [
    "ops", "reference", "step_saliency_pool", "oeb_attention", "step_momentum", "step_momentum_decode_",
    "Segmentation", "segment", "StepTracker", "markers_for", "id_sets_for", "StepFlowConfig", "replace_attention", "StepFlowHandle",
    "step_saliency", "StepSaliencyResult", "saliency", "cuda_compiled", "__version__", "load_default",
]
