#pragma once
// Index arithmetic of the CUDA kernels that is worth checking on its own: plain integer functions
// (host and device), used by csrc/cuda/*.cu and compiled on the CPU by
// tests/test_cuda_index_emulation.py, which holds them against emulators written from the
// definitions (the causal band of tiles, the PTX ISA's ldmatrix and mma.sync layouts).
#include <cstdint>

#if defined(__CUDACC__)
#define STEPFLOW_HD __host__ __device__ __forceinline__
#else
#define STEPFLOW_HD inline
#endif

namespace stepflow {
namespace index {

// ------------------------------------------------------------------ step_saliency_pool: key splits

// The main kernel's key tiles [kt_begin, kt_end] (inclusive; empty when kt_begin > kt_end) for
// the query block starting at i0 (blocks of `block` rows, tiles of `block` keys) of a row whose
// valid tokens are [lo, hi): from the window start of the block's first query (or lo) to its last
// query. With tiles_per_split = n > 0, split number `split` of the block takes the split-th run
// of n of those tiles.
STEPFLOW_HD void pool_block_key_tiles(int64_t i0, int64_t lo, int64_t hi, int64_t window, int64_t block,
                                      int64_t tiles_per_split, int64_t split, int64_t& kt_begin, int64_t& kt_end) {
  const int64_t key_lo = window > 0 ? (i0 - window + 1 > lo ? i0 - window + 1 : lo) : lo;
  kt_begin = key_lo / block;
  kt_end = (i0 + block - 1 < hi - 1 ? i0 + block - 1 : hi - 1) / block;
  if (tiles_per_split > 0) {
    kt_begin += split * tiles_per_split;
    const int64_t last = kt_begin + tiles_per_split - 1;
    kt_end = last < kt_end ? last : kt_end;
  }
}

// How many key tiles each CTA of the main kernel takes (0: all of its query block's) and how many
// splits the grid has, from the shapes only (the row bounds live on the device). path: -1 auto,
// 0 off, n > 0 n tiles per split. Auto: a query block's work is its number of key tiles, 1 to
// T / block, so with few rows at long T (T = 8192, B = 1: 128 CTAs) the grid is one uneven wave;
// pieces of about total / (8 SMs) tiles (at least 2) give several waves of similar CTAs.
struct PoolSplit {
  int64_t tiles_per_split, splits;
};
STEPFLOW_HD PoolSplit pool_plan_split(int64_t T, int64_t B, int64_t window, int64_t block, int64_t path,
                                      int64_t num_sms) {
  const int64_t nqb = (T + block - 1) / block;
  int64_t max_tiles = nqb;  // the most key tiles a query block can have
  if (window > 0) {
    const int64_t w = (window + block - 2) / block + 2;
    max_tiles = w < nqb ? w : nqb;
  }
  int64_t per = 0;
  if (path > 0) {
    per = path;
  } else if (path < 0) {
    const int64_t total = B * (window > 0 ? nqb * max_tiles : nqb * (nqb + 1) / 2);
    const int64_t pieces = 8 * (num_sms > 1 ? num_sms : 1);
    per = (total + pieces - 1) / pieces;
    per = per < 2 ? 2 : per;
  }
  if (per <= 0 || per >= max_tiles) return {0, 1};
  return {per, (max_tiles + per - 1) / per};
}

// --------------------------------------------------------------- ldmatrix.trans of V (oeb_attention)

// Row (key, relative to the tile) and column (head dim) of the shared-memory row whose address
// lane `lane` hands to ldmatrix.m8n8.x4.trans for the B fragments of column tiles n0 and n0 + 8
// at keys k0 .. k0 + 15: lanes 8q .. 8q + 7 address matrix q = keys k0 + 8 (q & 1) + [0, 8),
// columns n0 + 8 (q >> 1) + [0, 8).
STEPFLOW_HD void ldm_x4_trans_row(int lane, int k0, int n0, int& row, int& col) {
  const int q = lane >> 3;
  row = k0 + 8 * (q & 1) + (lane & 7);
  col = n0 + 8 * (q >> 1);
}
// The same for .x2 (one column tile n0): lanes 0 .. 15 address keys k0 .. k0 + 15 (lanes 16 .. 31
// repeat them; ldmatrix .x2 ignores their addresses).
STEPFLOW_HD void ldm_x2_trans_row(int lane, int k0, int n0, int& row, int& col) {
  row = k0 + (lane & 15);
  col = n0;
}

// ------------------------------------------------------------ oeb_attention: one-slot key tiles

// The slot (0, 1, 2) whose key range [k[s], k[s + 1]) holds all keys [j0, j0 + bn) of a tile, or
// -1 (the tile straddles a boundary, or the row is not active).
STEPFLOW_HD int tile_slot(bool active, const int (&k)[4], int j0, int bn) {
  int slot = -1;
  for (int s = 0; s < 3; ++s)
    if (active && k[s] <= j0 && j0 + bn <= k[s + 1]) slot = s;
  return slot;
}

}  // namespace index
}  // namespace stepflow
