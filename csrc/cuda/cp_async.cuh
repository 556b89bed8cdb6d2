#pragma once
// Asynchronous 16-byte global -> shared copies (cp.async, sm_80+), shared by the kernels that stage
// tiles with them (oeb_attention.cu, step_saliency_pool.cu). Below sm_80 they compile to nothing:
// those builds never take the paths that call them.

namespace stepflow {
namespace {

// valid = false copies nothing and fills the 16 bytes with zeros (src-size 0); gmem must still be a
// valid address.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight. The "memory" clobber
// keeps the compiler from moving shared-memory reads of the copied tile above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace
}  // namespace stepflow
