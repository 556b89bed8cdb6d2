"""The index arithmetic of issue 15's CUDA changes, checked on the CPU (no GPU needed).

The kernels take it from csrc/include/kernel_index.h (plain integer functions, host and device).
This test compiles that header into a small host program and holds its answers against emulators
written from the definitions:

- step_saliency_pool's split of each query block's key tiles over several CTAs
  (pool_plan_split, pool_block_key_tiles): over many T, row bounds (padding), sliding windows and
  split sizes, the CTAs of the grid visit every (query block, key tile) pair that holds a causal
  (query, key) pair of valid tokens exactly once, and no other tile;
- oeb_attention's V fragments by ldmatrix.trans (ldm_x4_trans_row, ldm_x2_trans_row): with the
  PTX ISA's ldmatrix distribution (lanes 8q..8q+7 address the rows of matrix q; with .trans lane
  4g + t receives rows 2t, 2t + 1 of column g) every lane's registers hold exactly the elements of
  the m16n8k16 B fragment (b0, b1: k = 2t, 2t + 1; b2, b3: k = 2t + 8, 2t + 9; n = g) that the
  scalar loads (load_b_kmajor) gave; the row addresses are 16-byte aligned and each 8-row phase
  is free of bank conflicts for the kernel's shared-memory layout;
- oeb_attention's one-slot tiles (tile_slot): a tile is called one slot's exactly when every key
  of it has that slot by the kernel's per-element slot_of.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 64  # step_saliency_pool's kBlock

DRIVER = r"""
#include <cstdio>
#include <cstring>
#include "kernel_index.h"
using namespace stepflow::index;
int main() {
  char cmd[8];
  while (std::scanf("%7s", cmd) == 1) {
    if (!std::strcmp(cmd, "P")) {
      long long T, B, w, block, path, sms;
      std::scanf("%lld %lld %lld %lld %lld %lld", &T, &B, &w, &block, &path, &sms);
      const PoolSplit s = pool_plan_split(T, B, w, block, path, sms);
      std::printf("%lld %lld\n", (long long)s.tiles_per_split, (long long)s.splits);
    } else if (!std::strcmp(cmd, "K")) {
      long long i0, lo, hi, w, block, tps, split;
      std::scanf("%lld %lld %lld %lld %lld %lld %lld", &i0, &lo, &hi, &w, &block, &tps, &split);
      int64_t b, e;
      pool_block_key_tiles(i0, lo, hi, w, block, tps, split, b, e);
      std::printf("%lld %lld\n", (long long)b, (long long)e);
    } else if (!std::strcmp(cmd, "L4") || !std::strcmp(cmd, "L2")) {
      int lane, k0, n0, row, col;
      std::scanf("%d %d %d", &lane, &k0, &n0);
      if (cmd[1] == '4') ldm_x4_trans_row(lane, k0, n0, row, col); else ldm_x2_trans_row(lane, k0, n0, row, col);
      std::printf("%d %d\n", row, col);
    } else if (!std::strcmp(cmd, "S")) {
      int active, j0, bn;
      int k[4];
      std::scanf("%d %d %d %d %d %d %d", &active, &k[0], &k[1], &k[2], &k[3], &j0, &bn);
      std::printf("%d\n", tile_slot(active != 0, k, j0, bn));
    } else {
      return 2;
    }
  }
  return 0;
}
"""


@functools.lru_cache(maxsize=None)
def _driver(tmpdir: str) -> str:
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the index driver")
    src, exe = os.path.join(tmpdir, "index_driver.cpp"), os.path.join(tmpdir, "index_driver")
    with open(src, "w") as f:
        f.write(DRIVER)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), src, "-o", exe],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def ask(tmp_path_factory):
    exe = _driver(str(tmp_path_factory.mktemp("index")))

    def run(lines):
        out = subprocess.run([exe], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True).stdout
        return [tuple(int(x) for x in row.split()) for row in out.splitlines()]
    return run


# ------------------------------------------------------------------------ step_saliency_pool


def needed_tiles(t, lo, hi, window, block=BLOCK):
    """{(query block, key tile)} holding a pair (i, j): lo <= j <= i < hi, j > i - window (window > 0)."""
    tiles = set()
    for i in range(max(lo, 0), min(hi, t)):
        first = lo if window <= 0 else max(lo, i - window + 1)
        for kt in range(first // block, i // block + 1):
            tiles.add((i // block, kt))
    return tiles


def visited_tiles(ask, t, lo, hi, window, plans, block=BLOCK):
    """For each plan (path, B, SMs): the (query block, key tile) pairs the main kernel's grid visits
    for a row with valid tokens [lo, hi), as a list (repeats kept) -- the plan, the CTAs' early
    exits, their tile ranges -- with the plan's (tiles per split, splits). Two driver calls."""
    made = ask([f"P {t} {b} {window} {block} {path} {sms}" for path, b, sms in plans])
    nqb = (t + block - 1) // block
    queries, owners = [], []
    for x, (per, splits) in enumerate(made):
        assert 1 <= splits <= 65535 and per >= 0 and (per > 0) == (splits > 1)
        for qb in range(nqb):
            i0 = qb * block
            if i0 >= hi or i0 + block <= lo:      # the kernel's early return (no valid query)
                continue
            for split in range(splits):
                queries.append(f"K {i0} {lo} {hi} {window} {block} {per} {split}")
                owners.append((x, qb))
    visits = [[] for _ in plans]
    for (x, qb), (kb, ke) in zip(owners, ask(queries) if queries else []):
        visits[x].extend((qb, kt) for kt in range(kb, ke + 1))
    return [(v, per, splits) for v, (per, splits) in zip(visits, made)]


ROWS = [  # (T, lo, hi): full rows, left / right / both-sided padding, an empty row, odd lengths
    (1, 0, 1), (5, 0, 5), (63, 0, 63), (64, 0, 64), (65, 0, 65), (127, 3, 127), (128, 0, 100), (200, 70, 200),
    (200, 130, 131), (333, 5, 300), (1000, 0, 1000), (1000, 640, 1000), (97, 97, 0), (4097, 1, 4097),
]


@pytest.mark.parametrize("t,lo,hi", ROWS)
@pytest.mark.parametrize("window", [-1, 1, 5, 64, 65, 100, 700])
def test_pool_split_covers_the_causal_band_once(ask, t, lo, hi, window):
    base = needed_tiles(t, lo, hi, window)
    # fixed split sizes do not depend on B or the SM count; auto does
    plans = [(p, 1, 132) for p in (0, 1, 2, 3, 7, 1000)] + [(-1, 1, 1), (-1, 1, 132), (-1, 3, 132)]
    for (path, _, _), (got, per, splits) in zip(plans, visited_tiles(ask, t, lo, hi, window, plans)):
        assert len(got) == len(set(got)), f"a tile is visited twice (path {path}, {per} x {splits})"
        assert set(got) == base, (f"T={t} rows [{lo}, {hi}) window {window} path {path}: missing "
                                  f"{sorted(base - set(got))[:5]}, extra {sorted(set(got) - base)[:5]}")
        if path == 0:
            assert (per, splits) == (0, 1)


@pytest.mark.parametrize("block", [16, 32, 128])
def test_pool_split_other_block_sizes(ask, block):
    """The same arithmetic with other block sizes than the kernel's 64 (it takes the size as an
    argument): still every causal tile once."""
    for t, lo, hi in ((1, 0, 1), (100, 3, 97), (333, 0, 333), (700, 200, 650)):
        for window in (-1, 1, block - 1, block + 1, 250):
            base = needed_tiles(t, lo, hi, window, block)
            plans = [(p, 1, 132) for p in (0, 1, 2, 5)] + [(-1, 1, 1), (-1, 2, 8)]
            for (path, _, _), (got, per, splits) in zip(plans, visited_tiles(ask, t, lo, hi, window, plans, block)):
                assert len(got) == len(set(got)) and set(got) == base, (block, t, lo, hi, window, path, per, splits)


@pytest.mark.parametrize("window", [-1, 512])
def test_pool_split_at_t8192_b1_fills_the_gpu(ask, window):
    """The case of issue 15 item 7: T = 8192, B = 1, 132 SMs. The auto plan splits, every causal tile
    is visited once, and the CTAs that have work are several times the SM count, none with more
    than per tiles (without the split the largest CTA has 128 tiles)."""
    t = 8192
    (per, splits), = ask([f"P {t} 1 {window} {BLOCK} -1 132"])
    assert per >= 2 and splits > 1
    (got, _, _), = visited_tiles(ask, t, 0, t, window, [(-1, 1, 132)])
    assert len(got) == len(set(got)) and set(got) == needed_tiles(t, 0, t, window)
    nqb = t // BLOCK
    works = ask([f"K {qb * BLOCK} 0 {t} {window} {BLOCK} {per} {s}" for qb in range(nqb) for s in range(splits)])
    busy = [e - b + 1 for b, e in works if e >= b]
    assert max(busy) <= per and len(busy) >= 4 * 132, (per, splits, len(busy))
    (per0, splits0), = ask([f"P {t} 1 {window} {BLOCK} 0 132"])
    assert (per0, splits0) == (0, 1)


def test_pool_split_plan_bounds(ask):
    """Many rows already fill the GPU less unevenly, but the plan still only cuts into pieces of at
    least 2 tiles; a fixed split size is taken as given; a split as large as the band is no split."""
    for t in (64, 640, 2048, 8192, 32768):
        for b in (1, 4, 64):
            (per, splits), = ask([f"P {t} {b} -1 {BLOCK} -1 132"])
            nqb = (t + BLOCK - 1) // BLOCK
            assert (per, splits) == (0, 1) or (2 <= per < nqb and splits == -(-nqb // per))
    assert ask([f"P 8192 1 -1 {BLOCK} 5 132"]) == [(5, 26)]
    assert ask([f"P 8192 1 -1 {BLOCK} 128 132"]) == [(0, 1)]


# ------------------------------------------------------------------ oeb_attention: ldmatrix.trans


def ldmatrix(addresses, trans):
    """PTX ISA ldmatrix .m8n8 .b16: addresses[l] (an element index of the first of 8 consecutive
    16-bit elements) is row l % 8 of matrix l // 8; returns regs[lane][q] = (low, high) element
    indices lane receives from matrix q."""
    nmat = len(addresses) // 8
    regs = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        mine = []
        for q in range(nmat):
            rows = addresses[8 * q:8 * q + 8]
            if trans:   # the transposed matrix's row g, columns 2t, 2t + 1 = rows 2t, 2t + 1, column g
                mine.append((rows[2 * t] + g, rows[2 * t + 1] + g))
            else:
                mine.append((rows[g] + 2 * t, rows[g] + 2 * t + 1))
        regs.append(mine)
    return regs


def b_fragment(lane, ld, k0, n0):
    """PTX ISA m16n8k16 (.f16 / .bf16) B fragment of lane: two registers of (low, high) elements,
    B[k][n] at V's shared row k0 + k, column n0 + n: b0, b1 = k 2t, 2t + 1; b2, b3 = k 2t + 8, 2t + 9;
    n = lane // 4."""
    g, t = lane // 4, lane % 4
    at = lambda k: (k0 + k) * ld + n0 + g  # noqa: E731
    return [(at(2 * t), at(2 * t + 1)), (at(2 * t + 8), at(2 * t + 9))]


def scalar_b_kmajor(lane, ld, k0, n0):
    """What the kernel's scalar load_b_kmajor packs (pack_bits(p, p + ld), pack_bits(p + 8 ld, p + 9 ld))."""
    grp, tig = lane >> 2, lane & 3
    p = (k0 + 2 * tig) * ld + n0 + grp
    return [(p, p + ld), (p + 8 * ld, p + 9 * ld)]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bn", [32, 64])
def test_ldmatrix_trans_gives_the_mma_b_fragments(ask, d, bn):
    ld = d + 8                                   # MmaFwdCfg::LD
    for kc in range(bn // 16):
        k0 = 16 * kc
        for n0 in range(0, d, 16):               # x4: column tiles n0 and n0 + 8
            rows = ask([f"L4 {lane} {k0} {n0}" for lane in range(32)])
            regs = ldmatrix([r * ld + c for r, c in rows], trans=True)
            for lane in range(32):
                assert regs[lane][:2] == b_fragment(lane, ld, k0, n0) == scalar_b_kmajor(lane, ld, k0, n0)
                assert regs[lane][2:] == b_fragment(lane, ld, k0, n0 + 8) == scalar_b_kmajor(lane, ld, k0, n0 + 8)
            # the emulator tells .trans apart: without it the lanes would get other elements
            plain = ldmatrix([r * ld + c for r, c in rows], trans=False)
            assert any(plain[lane][:2] != b_fragment(lane, ld, k0, n0) for lane in range(32))
        for n0 in range(0, d, 8):                # x2: one column tile (the U_0 update)
            rows = ask([f"L2 {lane} {k0} {n0}" for lane in range(32)])
            assert rows[16:] == rows[:16]        # lanes 16..31 repeat valid addresses
            regs = ldmatrix([r * ld + c for r, c in rows[:16]], trans=True)
            for lane in range(32):
                assert regs[lane] == b_fragment(lane, ld, k0, n0) == scalar_b_kmajor(lane, ld, k0, n0)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bn", [32, 64])
@pytest.mark.parametrize("nw", [1, 4])
def test_ldmatrix_rows_are_aligned_and_conflict_free(ask, d, bn, nw):
    """The kernel's shared layout: Q (16 nw rows), then K, V of buffer 0 and 1 (bn rows each), rows of
    LD = d + 8 16-bit elements. Every address ldmatrix reads is 16-byte aligned, and the 8 rows of
    each phase fall on 8 different 4-bank groups (no bank conflicts)."""
    ld = d + 8
    for buf in (0, 1):
        v_base = 16 * nw * ld + 2 * buf * bn * ld + bn * ld     # sV of buffer buf, in elements
        for kc in range(bn // 16):
            for n0 in range(0, d, 16):
                rows = ask([f"L4 {lane} {16 * kc} {n0}" for lane in range(32)])
                byte = [2 * (v_base + r * ld + c) for r, c in rows]
                assert all(x % 16 == 0 for x in byte)
                for phase in range(4):
                    groups = {(x // 16) % 8 for x in byte[8 * phase:8 * phase + 8]}
                    assert len(groups) == 8, f"bank conflict in phase {phase}"


# ------------------------------------------------------------ oeb_attention: one-slot key tiles


def slot_of(k, j):
    """The kernel's slot_of: -1 outside [k0, k3), else 0 / 1 / 2 by [k0, k1), [k1, k2), [k2, k3)."""
    if j < k[0] or j >= k[3]:
        return -1
    return 0 if j < k[1] else (1 if j < k[2] else 2)


def test_tile_slot_is_exactly_the_one_slot_tiles(ask):
    import random

    rnd = random.Random(0)
    cases = []
    for _ in range(3000):
        k0 = rnd.randrange(0, 200)
        k1 = k0 + rnd.choice([0, 0, rnd.randrange(0, 150)])
        k2 = k1 + rnd.choice([0, rnd.randrange(0, 150)])
        k3 = k2 + rnd.randrange(0, 200)
        bn = rnd.choice([32, 64])
        j0 = rnd.randrange(0, 600 // bn) * bn
        cases.append((rnd.random() < 0.95, (k0, k1, k2, k3), j0, bn))
    # rows that are not intervened: k = (x, x, x, w), every key in slot 2
    cases += [(True, (x, x, x, x + n), j0, 32) for x in (0, 5, 64) for n in (0, 31, 32, 100, 640)
              for j0 in range(0, 800, 32)]
    got = ask([f"S {int(a)} {k[0]} {k[1]} {k[2]} {k[3]} {j0} {bn}" for a, k, j0, bn in cases])
    fast = 0
    for (active, k, j0, bn), (slot,) in zip(cases, got):
        slots = {slot_of(k, j) for j in range(j0, j0 + bn)} if active else {-1}
        want = slots.pop() if len(slots) == 1 else -1
        assert slot == want, (active, k, j0, bn, slot, want)
        fast += slot >= 0
    assert fast > len(cases) // 10      # the fast path is common in these cases, so the check has teeth
