#pragma once
// Kernel path switches (docs/method_kernels.md, "Kernel paths and their switches"): which of two
// exact implementations a CUDA kernel takes, so that a GPU run can hold the new path against the
// old one and the reference in one process. Each starts from an environment variable, read once
// (at the module's load), and can be changed at run time by stepflow_ext.ops.kernel_paths(...)
// (a context manager over _C._set_kernel_path); the kernels read them on the host at each launch.
//
//   pool_split        STEPFLOW_POOL_SPLIT       step_saliency_pool: split each query block's key
//                                               tiles over several CTAs. -1 (unset, "auto"): tiles
//                                               per CTA sized from the shapes and the SM count;
//                                               0: off (one CTA per query block, the old grid);
//                                               n > 0: n key tiles per CTA (tests).
//   pool_pipeline     STEPFLOW_POOL_PIPELINE    step_saliency_pool: cp.async double-buffered tiles
//                                               (bf16 / fp16, one head-dim chunk). 1 (default) / 0.
//   oeb_ldmatrix      STEPFLOW_OEB_LDMATRIX     oeb_attention tensor-core row kernel: V fragments by
//                                               ldmatrix.trans. 1 (default) / 0: scalar 16-bit loads.
//   oeb_tile_fast     STEPFLOW_OEB_TILE_FAST    the same kernel: key tiles that lie inside one slot
//                                               for all 16 rows of a warp skip the per-element group
//                                               masks. 1 (default) / 0.
//   oeb_bn            STEPFLOW_OEB_BN           keys per tile of that kernel at head dim 128: 32
//                                               (0 or unset: the default) or 64.
#include <atomic>

namespace stepflow {

enum KernelPath : int { kPoolSplit = 0, kPoolPipeline, kOebLdmatrix, kOebTileFast, kOebBn, kNumKernelPaths };

// The current value of a switch (defined in csrc/ops.cpp).
int kernel_path(KernelPath which);

}  // namespace stepflow
