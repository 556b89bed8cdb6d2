"""StepFlow: Step-Saliency diagnostics and StepFlow test-time repair for reasoning models.

See shared design (docs/method.md) for the equations. The compiled ops live in
`stepflow_ext._C` and are reachable as `torch.ops.stepflow.*`; `stepflow_ext.ops` wraps
them with argument checks.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, ops, reference
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
