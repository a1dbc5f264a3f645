// The index logic of the minlora CUDA kernels, run on the CPU: built by tests/ops/test_kernel_logic.py
// with g++ and AddressSanitizer / UndefinedBehaviorSanitizer, over the same __host__ __device__
// headers the kernels include (csrc/cuda/kernels: lora_index.h, dispatch.h, lora_grouped_desc.h).
//
//   harness selftest SEED ROUNDS   hostile random plans: every token has one owner, the blocks and
//                                  segments that handle it agree with it, and the grids, splits and
//                                  workspace layouts are in bounds and aligned
//   harness emulate IN OUT         one op call (forward, adding forward or accumulating backward)
//                                  run block by block and problem by problem as the CUDA kernels
//                                  would, in float64, with the dispatcher's choice; the GEMMs are
//                                  driven by the kernels' operand descriptors.  Every output element
//                                  write is counted: the test fails on a second write, or (write-only)
//                                  on an element nobody wrote.
// Exit status 0 on success; a failed check prints what failed and exits 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernel_types.h"
#include "lora_grouped_desc.h"
#include "lora_index.h"

namespace k = minlora::kernels;
namespace g = minlora::kernels::grouped;

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  std::exit(1);
}

#define CHECK(cond, msg)                                                              \
  do {                                                                                \
    if (!(cond)) fail(std::string(msg) + " (" #cond ", line " + std::to_string(__LINE__) + ")"); \
  } while (0)

// ---- arrays exchanged with the Python test (a tiny tagged binary format)

struct Array {
  int dtype = 0;  // 0 float64, 1 int32, 2 int64
  std::vector<int64_t> dims;
  std::vector<double> f;
  std::vector<int32_t> i;
  std::vector<int64_t> l;
  int64_t dim(int d) const { return dims.at(d); }
};

using Arrays = std::map<std::string, Array>;

Arrays read_arrays(const char* path) {
  std::ifstream in(path, std::ios::binary);
  CHECK(in.good(), "cannot open the input");
  Arrays out;
  int32_t count = 0;
  in.read(reinterpret_cast<char*>(&count), 4);
  for (int32_t n = 0; n < count; ++n) {
    int32_t name_len = 0, dtype = 0, ndim = 0;
    in.read(reinterpret_cast<char*>(&name_len), 4);
    std::string name(static_cast<size_t>(name_len), '\0');
    in.read(name.data(), name_len);
    in.read(reinterpret_cast<char*>(&dtype), 4);
    in.read(reinterpret_cast<char*>(&ndim), 4);
    Array a;
    a.dtype = dtype;
    a.dims.resize(static_cast<size_t>(ndim));
    int64_t total = 1;
    for (auto& d : a.dims) {
      in.read(reinterpret_cast<char*>(&d), 8);
      total *= d;
    }
    if (dtype == 0) {
      a.f.resize(static_cast<size_t>(total));
      in.read(reinterpret_cast<char*>(a.f.data()), 8 * total);
    } else if (dtype == 1) {
      a.i.resize(static_cast<size_t>(total));
      in.read(reinterpret_cast<char*>(a.i.data()), 4 * total);
    } else {
      a.l.resize(static_cast<size_t>(total));
      in.read(reinterpret_cast<char*>(a.l.data()), 8 * total);
    }
    CHECK(in.good(), "truncated input");
    out[name] = std::move(a);
  }
  return out;
}

void write_arrays(const char* path, const std::map<std::string, std::vector<double>>& arrays) {
  std::ofstream out(path, std::ios::binary);
  const int32_t count = static_cast<int32_t>(arrays.size());
  out.write(reinterpret_cast<const char*>(&count), 4);
  for (const auto& [name, v] : arrays) {
    const int32_t len = static_cast<int32_t>(name.size());
    const int64_t n = static_cast<int64_t>(v.size());
    out.write(reinterpret_cast<const char*>(&len), 4);
    out.write(name.data(), len);
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(reinterpret_cast<const char*>(v.data()), 8 * n);
  }
}

// ---- plans, as the device builds them

// device_plan (lora_cuda.cpp): a stable sort by slot, slots outside 0..S-1 last with -1.
void build_plan(const std::vector<int32_t>& token_slot, int64_t S, std::vector<int32_t>& order,
                std::vector<int32_t>& seg) {
  const int64_t T = static_cast<int64_t>(token_slot.size());
  std::vector<int64_t> count(static_cast<size_t>(S + 2), 0);
  auto key = [&](int32_t s) { return s >= 0 && s < S ? static_cast<int64_t>(s) : S; };
  for (int64_t t = 0; t < T; ++t) ++count[key(token_slot[t]) + 1];
  for (int64_t s = 0; s <= S; ++s) count[s + 1] += count[s];
  seg.assign(static_cast<size_t>(S + 1), 0);
  for (int64_t s = 0; s <= S; ++s) seg[s] = static_cast<int32_t>(count[s]);
  order.assign(static_cast<size_t>(T), 0);
  for (int64_t t = 0; t < T; ++t) order[count[key(token_slot[t])]++] = static_cast<int32_t>(t);
}

// launch_plan_positions: -1, then positions[order[q]] = q in any order (here: the last q wins).
std::vector<int32_t> plan_positions(const std::vector<int32_t>& order) {
  const int64_t T = static_cast<int64_t>(order.size());
  std::vector<int32_t> pos(static_cast<size_t>(T), -1);
  for (int64_t q = 0; q < T; ++q)
    if (order[q] >= 0 && order[q] < T) pos[order[q]] = static_cast<int32_t>(q);
  return pos;
}

// ---- write counting

// Counts writes to each element of an output [rows, cols]; add(r, c, v) accumulates, put stores.
struct Output {
  std::vector<double> data;
  std::vector<int32_t> writes;
  int64_t rows = 0, cols = 0;
  bool count_writes = true;
  Output(int64_t r, int64_t c, double fill) : data(static_cast<size_t>(r * c), fill), writes(static_cast<size_t>(r * c), 0), rows(r), cols(c) {}
  size_t at(int64_t r, int64_t c) const {
    CHECK(r >= 0 && r < rows && c >= 0 && c < cols, "output index out of bounds");
    return static_cast<size_t>(r * cols + c);
  }
  void put(int64_t r, int64_t c, double v) {
    const size_t i = at(r, c);
    data[i] = v;
    ++writes[i];
  }
  void add(int64_t r, int64_t c, double v) {
    const size_t i = at(r, c);
    data[i] += v;
    ++writes[i];
  }
};

// ---- the emulated op

struct Op {
  // inputs
  int64_t T = 0, S = 0, R = 0, in = 0, out = 0, Pa = 0, Pb = 0;
  std::vector<double> x, a_pool, b_pool, scales, grad_y;
  std::vector<float> scales_f;  // what the kernels read
  std::vector<int32_t> a_pages, b_pages, ranks, token_slot;
  std::vector<int32_t> order, seg, positions;
  bool has_plan = false, has_positions = false;
  int64_t max_segment = -1;
  k::KernelMode mode = k::KernelMode::kAuto;
  int sm_count = 132, vec = 8;
  bool half = true, aligned = true;
};

const double* pool_row(const std::vector<double>& pool, int64_t len, int32_t page) {
  CHECK(page >= 0 && static_cast<size_t>((page + 1) * len) <= pool.size(), "a page outside its pool was read");
  return pool.data() + page * len;
}

// Whether every page below rank r of slot s lies in its pool, in both tables (slot_pages_ok).
bool slot_pages_ok(const std::vector<int32_t>& pa, int64_t na, const std::vector<int32_t>& pb, int64_t nb,
                   int64_t R, int32_t s, int r) {
  for (int j = 0; j < r; ++j)
    if (!k::page_in_pool(pa.at(s * R + j), na) || !k::page_in_pool(pb.at(s * R + j), nb)) return false;
  return true;
}

// One shrink-then-expand's operands: act [T, len_in] -> shrink pages -> expand pages (len_out).
struct SE {
  const std::vector<double>* act;
  int64_t len_in;
  const std::vector<double>* shrink_pool;
  const std::vector<int32_t>* shrink_pages;
  int64_t num_shrink;
  const std::vector<double>* expand_pool;
  const std::vector<int32_t>* expand_pages;
  int64_t num_expand;
  int64_t len_out;
};

// The gather kernels: fused or split shrink / expand, with the zero pass (write-only).
// partial [k_splits, T, R] (float32 sums, unscaled) is returned for the backward.
std::vector<double> emulate_gather(const Op& op, const k::PlanView& view, const k::Choice& c, const SE& se,
                                   Output* y, bool accumulate, bool run_shrink, bool run_expand) {
  const int64_t T = op.T, R = op.R;
  const k::GatherLaunch& L = c.launch;
  const int32_t splits = L.fused ? 1 : L.k_splits;
  std::vector<double> partial(static_cast<size_t>(splits * T * R), std::nan(""));
  const int TOKMAX = k::kGatherTokens;
  auto group = [&](int64_t b, int32_t* slot, int64_t (&tok)[k::kGatherTokens]) {
    bool has;
    if (c.mode.planned) {
      has = k::gather_group<k::kGatherTokens>(view, c.mode, b, slot, tok);
    } else {
      int64_t one[1];
      has = k::gather_group<1>(view, c.mode, b, slot, one);
      for (int i = 0; i < TOKMAX; ++i) tok[i] = i == 0 ? one[0] : -1;
    }
    return has;
  };
  // The shrink of every group (the fused kernel's first half, or the split shrink's blocks).
  if (run_shrink) {
    for (int64_t b = 0; b < T; ++b) {
      int32_t s = -1;
      int64_t tok[k::kGatherTokens];
      if (!group(b, &s, tok)) continue;
      const int r = k::rank_of_slot(view, s);
      if (!slot_pages_ok(*se.shrink_pages, se.num_shrink, *se.expand_pages, se.num_expand, R, s, r)) continue;
      for (int32_t q = 0; q < splits; ++q) {
        const int64_t k0 = q * L.k_chunk, k1 = std::min(k0 + L.k_chunk, se.len_in);
        CHECK(L.fused || k0 % (32 * op.vec) == 0, "a shrink split starts off a warp's 16-byte step");
        for (int i = 0; i < TOKMAX; ++i) {
          if (tok[i] < 0) continue;
          for (int j = 0; j < r; ++j) {
            const int32_t page = se.shrink_pages->at(s * R + j);
            double acc = 0;
            if (k::page_in_pool(page, se.num_shrink)) {
              const double* row = pool_row(*se.shrink_pool, se.len_in, page);
              for (int64_t kk = k0; kk < k1; ++kk) acc += se.act->at(tok[i] * se.len_in + kk) * row[kk];
            }
            partial.at((q * T + tok[i]) * R + j) = acc;
          }
        }
      }
    }
  }
  if (!run_expand) return partial;
  const int32_t tiles = L.fused ? 1 : L.n_tiles;
  const int64_t n_chunk = L.fused ? se.len_out : L.n_chunk;
  for (int64_t b = 0; b < T; ++b) {
    int32_t s = -1;
    int64_t tok[k::kGatherTokens];
    const bool has = group(b, &s, tok);
    const bool zero_row = !accumulate && k::token_owner(view, c.mode, b) == k::Owner::kNone;
    for (int32_t tile = 0; tile < tiles; ++tile) {
      const int64_t c0 = tile * n_chunk, c1 = std::min(c0 + n_chunk, se.len_out);
      CHECK(L.fused || c0 % (32 * op.vec) == 0, "an expand tile starts off a warp's 16-byte step");
      if (has) {
        const int r = k::rank_of_slot(view, s);
        const bool ok = slot_pages_ok(*se.shrink_pages, se.num_shrink, *se.expand_pages, se.num_expand, R, s, r);
        for (int i = 0; i < TOKMAX; ++i) {
          if (tok[i] < 0) continue;
          if (accumulate && !ok) continue;
          std::vector<double> h(static_cast<size_t>(r), 0.0);
          if (ok)
            for (int j = 0; j < r; ++j) {
              double sum = 0;
              for (int32_t q = 0; q < splits; ++q) sum += partial.at((q * T + tok[i]) * R + j);
              h[j] = sum * op.scales.at(s);
            }
          for (int64_t cc = c0; cc < c1; ++cc) {
            double acc = 0;
            if (ok)
              for (int j = 0; j < r; ++j) {
                const int32_t page = se.expand_pages->at(s * R + j);
                if (!k::page_in_pool(page, se.num_expand)) continue;
                acc += h[j] * pool_row(*se.expand_pool, se.len_out, page)[cc];
              }
            if (accumulate) {
              y->add(tok[i], cc, acc);
            } else {
              y->put(tok[i], cc, acc);
            }
          }
        }
      }
      if (zero_row)
        for (int64_t cc = c0; cc < c1; ++cc) y->put(b, cc, 0.0);
    }
  }
  return partial;
}

// ---- the grouped path, problem by problem through the descriptors

struct Workspace {
  std::vector<g::ProblemSize> shrink_sizes, expand_sizes, grad_sizes;
  std::vector<int32_t> seg_begin, grad_pos, tokens, shrink_idx, expand_idx;
  std::vector<float> partial_unused;
};

// An index array and how many entries remain from its pointer (bounds of the gathers).
int64_t remaining(const int32_t* p, const std::vector<int32_t>& v) {
  CHECK(p >= v.data() && p <= v.data() + v.size(), "an index pointer outside its array");
  return static_cast<int64_t>(v.data() + v.size() - p);
}

int32_t index_at(const int32_t* idx, int64_t n, const std::vector<int32_t>& arr) {
  CHECK(n >= 0 && n < remaining(idx, arr), "a gather index read out of its array");
  return idx[n];
}

void check_aligned(int64_t offset, int64_t ld, int esize, const char* what) {
  CHECK(offset * esize % 16 == 0, std::string(what) + ": offset not 16-byte aligned");
  CHECK(ld * esize % 16 == 0, std::string(what) + ": leading dimension not a 16-byte multiple");
}

// hs [T, ldh] (the shrink's output / the gradients' A operand) and the partial sums.
struct GroupedBuffers {
  std::vector<double> hs;
  std::vector<double> partial;
};

g::KernelParams grouped_params(const Op& op, const k::PlanView& view, int64_t grouped_min, Workspace& w,
                               int32_t k_splits, int64_t k_split_len, int32_t grad_splits) {
  const int64_t T = op.T, S = op.S, ldh = k::grouped_hs_width(op.R);
  w.shrink_sizes.assign(static_cast<size_t>(S * k_splits), {-1, -1, -1});
  w.expand_sizes.assign(static_cast<size_t>(S), {-1, -1, -1});
  w.grad_sizes.assign(static_cast<size_t>(S * grad_splits), {-1, -1, -1});
  w.seg_begin.assign(static_cast<size_t>(S), -7);
  w.grad_pos.assign(static_cast<size_t>(S * grad_splits), -7);
  w.tokens.assign(static_cast<size_t>(T), -7);  // never-initialised scratch on the GPU: -7 marks it
  w.shrink_idx.assign(static_cast<size_t>(S * ldh), -7);
  w.expand_idx.assign(static_cast<size_t>(S * ldh), -7);
  g::KernelParams p{};
  p.plan = view;
  p.mode = k::GatherMode{true, k::kGatherTokens, grouped_min};
  p.scales = op.scales_f.data();
  p.shrink_sizes = w.shrink_sizes.data();
  p.expand_sizes = w.expand_sizes.data();
  p.grad_sizes = w.grad_sizes.data();
  p.seg_begin = w.seg_begin.data();
  p.grad_pos = w.grad_pos.data();
  p.tokens = w.tokens.data();
  p.shrink_idx = w.shrink_idx.data();
  p.expand_idx = w.expand_idx.data();
  p.ldh = ldh;
  p.k_splits = k_splits;
  p.k_split_len = k_split_len;
  p.grad_splits = grad_splits;
  return p;
}

// The prep kernel, one "thread" per slot (grouped_prep_kernel).
void emulate_prep(const g::KernelParams& p, Output* out) {
  for (int32_t s = 0; s < p.plan.num_slots; ++s) {
    k::Segment seg;
    const bool wanted = k::grouped_wants(p.plan, p.mode, s, &seg);
    const int r = k::rank_of_slot(p.plan, s);
    const bool bad = wanted && g::prep_check(p, s, seg, r, 0, 1);
    const bool accepted = wanted && !bad;
    g::prep_write(p, s, seg, r, accepted, 0, 1);
    if (!wanted || accepted || out == nullptr || p.accumulate) continue;
    for (int64_t q = seg.begin; q < seg.end; ++q) {
      const int64_t t = g::prep_zero_token(p, s, q);
      if (t >= 0)
        for (int64_t c = 0; c < out->cols; ++c) out->put(t, c, 0.0);
    }
  }
}

void emulate_shrink_expand(const Op& op, g::KernelParams& p, const Workspace& w, const SE& se, GroupedBuffers& buf,
                           Output* out) {
  const int64_t T = op.T, ldh = p.ldh;
  buf.hs.assign(static_cast<size_t>(T * ldh), 0.0);  // cudaMemsetAsync
  buf.partial.assign(static_cast<size_t>(p.k_splits * T * ldh), std::nan(""));
  // shrink problems
  for (int32_t s = 0; s < op.S; ++s)
    for (int32_t q = 0; q < p.k_splits; ++q) {
      const g::ProblemSize sz = w.shrink_sizes.at(s * p.k_splits + q);
      CHECK(sz.m >= 0, "a shrink problem size was not written");
      if (sz.m == 0 || sz.n == 0 || sz.k == 0) continue;
      const g::GemmDesc d = g::shrink_desc(p, s, q);
      CHECK(sz.k % 8 == 0, "the shrink's K (contiguous in both operands) is not a multiple of 8");
      check_aligned(d.a_offset, d.lda, 2, "shrink A");
      check_aligned(d.b_offset, d.ldb, 2, "shrink B");
      check_aligned(d.d_offset, d.ldd, p.k_splits > 1 ? 4 : 2, "shrink D");
      for (int m = 0; m < sz.m; ++m)
        for (int n = 0; n < sz.n; ++n) {
          double acc = 0;
          const int32_t row = index_at(d.a_idx, m, w.tokens);
          const int32_t page = index_at(d.b_idx, n, w.shrink_idx);
          CHECK(row >= 0 && row < T, "a gathered token row out of range");
          for (int kk = 0; kk < sz.k; ++kk)
            acc += se.act->at(row * se.len_in + d.a_offset + kk) * pool_row(*se.shrink_pool, se.len_in, page)[d.b_offset + kk];
          const double v = static_cast<double>(d.alpha) * acc;
          const int64_t at = d.d_offset + m * d.ldd + n;
          if (p.k_splits > 1) {
            buf.partial.at(static_cast<size_t>(at)) = v;
          } else {
            buf.hs.at(static_cast<size_t>(at)) = v;
          }
        }
    }
  if (p.k_splits > 1) {  // grouped_reduce_kernel
    for (int32_t s = 0; s < op.S; ++s) {
      const g::ProblemSize first = w.shrink_sizes.at(s * p.k_splits);
      if (first.m == 0) continue;
      const int64_t begin = w.seg_begin.at(s);
      for (int64_t e = 0; e < static_cast<int64_t>(first.m) * first.n; ++e) {
        const int64_t pos = begin + e / first.n, j = e % first.n;
        double acc = 0;
        for (int32_t q = 0; q < p.k_splits; ++q)
          if (w.shrink_sizes.at(s * p.k_splits + q).k > 0) acc += buf.partial.at(static_cast<size_t>((q * T + pos) * ldh + j));
        buf.hs.at(static_cast<size_t>(pos * ldh + j)) = acc;
      }
    }
  }
  if (out == nullptr) return;
  for (int32_t s = 0; s < op.S; ++s) {
    const g::ProblemSize sz = w.expand_sizes.at(s);
    CHECK(sz.m >= 0, "an expand problem size was not written");
    if (sz.m == 0 || sz.n == 0 || sz.k == 0) continue;
    const g::GemmDesc d = g::expand_desc(p, s);
    CHECK(sz.k % 8 == 0 && sz.n % 8 == 0, "the expand's contiguous extents are not multiples of 8");
    check_aligned(d.a_offset, d.lda, 2, "expand A");
    check_aligned(d.b_offset, d.ldb, 2, "expand B");
    check_aligned(d.d_offset, d.ldd, 2, "expand D");
    // Tiles as the grouped problem visitor numbers them, then the elements of each tile.
    const int32_t grid_m = (sz.m + g::kTileM - 1) / g::kTileM, grid_n = (sz.n + g::kTileN - 1) / g::kTileN;
    for (int32_t tile = 0; tile < grid_m * grid_n; ++tile) {
      int32_t row0, col0;
      g::tile_origin(tile, grid_n, g::kTileM, g::kTileN, &row0, &col0);
      for (int m = row0; m < std::min(row0 + g::kTileM, sz.m); ++m)
        for (int n = col0; n < std::min(col0 + g::kTileN, sz.n); ++n) {
          double acc = 0;
          for (int kk = 0; kk < sz.k; ++kk) {
            const int32_t page = index_at(d.b_idx, kk, w.expand_idx);
            acc += buf.hs.at(static_cast<size_t>(d.a_offset + m * d.lda + kk)) * pool_row(*se.expand_pool, se.len_out, page)[n];
          }
          const int32_t row = index_at(d.d_idx, m, w.tokens);
          CHECK(row >= 0 && row < T, "a scattered token row out of range");
          const double v = d.alpha * acc;
          if (d.beta != 0.f) {
            out->add(row, n, v);
          } else {
            out->put(row, n, v);
          }
        }
    }
  }
}

// The pool-gradient problems (atomic adds of alpha * the tile into the pages' rows).
void emulate_grad(const Op& op, g::KernelParams& p, const Workspace& w, const std::vector<double>& hs,
                  const std::vector<double>& v, std::vector<double>& grad, int64_t num_pages) {
  for (int32_t s = 0; s < op.S; ++s)
    for (int32_t q = 0; q < p.grad_splits; ++q) {
      const g::ProblemSize sz = w.grad_sizes.at(s * p.grad_splits + q);
      CHECK(sz.m >= 0, "a gradient problem size was not written");
      if (sz.m == 0 || sz.n == 0 || sz.k == 0) continue;
      const g::GemmDesc d = g::grad_desc(p, s, q);
      CHECK(sz.n % 8 == 0, "the gradient's N (contiguous in B) is not a multiple of 8");
      check_aligned(d.a_offset, d.lda, 2, "grad A");
      check_aligned(d.b_offset, d.ldb, 2, "grad B");
      const int32_t grid_m = (sz.m + g::kGradTileM - 1) / g::kGradTileM;
      const int32_t grid_n = (sz.n + g::kGradTileN - 1) / g::kGradTileN;
      for (int32_t tile = 0; tile < grid_m * grid_n; ++tile) {
        int32_t row0, col0;
        g::tile_origin(tile, grid_n, g::kGradTileM, g::kGradTileN, &row0, &col0);
        for (int m = row0; m < std::min(row0 + g::kGradTileM, sz.m); ++m) {
          const int32_t page = index_at(d.d_idx, m, w.shrink_idx);
          CHECK(page >= 0 && page < num_pages, "a gradient row outside its pool");
          for (int n = col0; n < std::min(col0 + g::kGradTileN, sz.n); ++n) {
            double acc = 0;
            for (int kk = 0; kk < sz.k; ++kk) {
              const int32_t row = index_at(d.b_idx, kk, w.tokens);
              CHECK(row >= 0 && row < op.T, "a gathered token row out of range");
              acc += hs.at(static_cast<size_t>(d.a_offset + kk * d.lda + m)) * v.at(static_cast<size_t>(row * d.ldb + n));
            }
            grad.at(static_cast<size_t>(page * d.ldd + n)) += d.alpha * acc;
          }
        }
      }
    }
}

// The segment-gradient kernel: per slot, position range and column, over segment_grad_token.
void emulate_segment_grad(const Op& op, const k::PlanView& view, const k::GatherMode& mode,
                          const std::vector<double>& partial, int32_t k_splits, const std::vector<double>& v,
                          const std::vector<int32_t>& pages, int64_t num_pages,
                          const std::vector<int32_t>& other, int64_t num_other, int32_t token_splits,
                          std::vector<double>& grad) {
  const int64_t T = op.T, R = op.R, len = static_cast<int64_t>(v.size()) / std::max<int64_t>(T, 1);
  for (int32_t s = 0; s < op.S; ++s) {
    const k::Segment seg = k::segment_of_slot(view, s);
    const int r = k::grouped_owns(mode, seg) ? 0 : k::rank_of_slot(view, s);
    if (r == 0 || !slot_pages_ok(pages, num_pages, other, num_other, R, s, r)) continue;
    int64_t covered = 0;
    for (int32_t z = 0; z < token_splits; ++z) {
      const k::PositionRange range = k::split_range(seg, z, token_splits, 1);
      CHECK(range.begin >= seg.begin && range.end <= seg.end && range.begin <= range.end, "a token range outside its segment");
      covered += range.end - range.begin;
      for (int64_t pos = range.begin; pos < range.end; ++pos) {
        const int64_t t = k::segment_grad_token(view, mode, s, pos);
        if (t < 0) continue;
        for (int j = 0; j < r; ++j) {
          const int32_t page = pages.at(s * R + j);
          if (!k::page_in_pool(page, num_pages)) continue;
          double cf = 0;
          for (int32_t q = 0; q < k_splits; ++q) cf += partial.at(static_cast<size_t>((q * T + t) * R + j));
          for (int64_t c = 0; c < len; ++c) grad.at(static_cast<size_t>(page * len + c)) += op.scales.at(s) * cf * v.at(t * len + c);
        }
      }
    }
    CHECK(covered == seg.length(), "the token ranges do not cover the segment");
  }
}

k::OpShape shape_of(const Op& op) {
  k::OpShape s{};
  s.num_tokens = op.T;
  s.num_slots = op.S;
  s.max_rank = op.R;
  s.in_features = op.in;
  s.out_features = op.out;
  s.max_segment = op.max_segment;
  s.sm_count = op.sm_count;
  s.vec = op.vec;
  s.half_precision = op.half;
  s.has_plan = op.has_plan;
  s.has_positions = op.has_positions;
  s.grouped_compiled = true;
  s.grouped_aligned = op.aligned;
  return s;
}

// The plan the kernels read: resolve_plan (lora_cuda.cpp).
k::PlanView resolve(Op& op, bool build, bool need_positions) {
  if (build) {
    build_plan(op.token_slot, op.S, op.order, op.seg);
    op.has_plan = true;
    op.positions.clear();
  }
  if (op.has_plan && op.positions.empty() && need_positions) op.positions = plan_positions(op.order);
  k::PlanView v{};
  v.token_slot = op.token_slot.data();
  v.ranks = op.ranks.data();
  const bool full = op.has_plan && !op.positions.empty();
  v.order = full ? op.order.data() : nullptr;
  v.seg_offsets = full ? op.seg.data() : nullptr;
  v.positions = full ? op.positions.data() : nullptr;
  v.num_tokens = op.T;
  v.num_slots = op.S;
  v.max_rank = op.R;
  return v;
}

int emulate(const char* in_path, const char* out_path) {
  Arrays a = read_arrays(in_path);
  Op op;
  const std::vector<int64_t>& cfg = a.at("config").l;
  const int64_t kind = cfg.at(0);  // 0 forward, 1 adding forward, 2 accumulating backward
  op.mode = static_cast<k::KernelMode>(cfg.at(1));
  op.sm_count = static_cast<int>(cfg.at(2));
  op.vec = static_cast<int>(cfg.at(3));
  op.half = cfg.at(4) != 0;
  op.aligned = cfg.at(5) != 0;
  op.max_segment = cfg.at(6);
  op.x = a.at("x").f;
  op.a_pool = a.at("a_pool").f;
  op.b_pool = a.at("b_pool").f;
  op.scales = a.at("scales").f;
  op.scales_f.assign(op.scales.begin(), op.scales.end());
  op.a_pages = a.at("a_pages").i;
  op.b_pages = a.at("b_pages").i;
  op.ranks = a.at("ranks").i;
  op.token_slot = a.at("token_slot").i;
  op.T = a.at("x").dim(0);
  op.in = a.at("x").dim(1);
  op.Pa = a.at("a_pool").dim(0);
  op.Pb = a.at("b_pool").dim(0);
  op.out = a.at("b_pool").dim(1);
  op.S = a.at("a_pages").dim(0);
  op.R = a.at("a_pages").dim(1);
  if (a.count("order")) {
    op.has_plan = true;
    op.order = a.at("order").i;
    op.seg = a.at("seg_offsets").i;
  }
  if (a.count("positions")) {
    op.has_positions = true;
    op.positions = a.at("positions").i;
  }
  std::map<std::string, std::vector<double>> results;
  const SE fwd{&op.x, op.in, &op.a_pool, &op.a_pages, op.Pa, &op.b_pool, &op.b_pages, op.Pb, op.out};
  if (kind == 0 || kind == 1) {
    const bool accumulate = kind == 1;
    const k::Choice c = k::choose_forward(shape_of(op), op.mode, !accumulate);
    const k::PlanView view = resolve(op, c.build_plan, c.need_positions);
    Output y(op.T, op.out, std::nan(""));
    if (accumulate) y.data = a.at("y0").f;
    if (c.mode.grouped_min > 0) {
      CHECK(view.positions != nullptr, "the grouped path without a plan");
      const g::KSplit ks = g::choose_k_splits(op.T, op.R, op.in, op.sm_count);
      Workspace w;
      g::KernelParams p = grouped_params(op, view, c.mode.grouped_min, w, ks.splits, ks.length, 1);
      p.shrink_pages = op.a_pages.data();
      p.expand_pages = op.b_pages.data();
      p.num_shrink_pages = op.Pa;
      p.num_expand_pages = op.Pb;
      p.act_len = op.in;
      p.out_len = op.out;
      p.out = &y;  // only compared with null
      p.accumulate = accumulate;
      p.shrink_scaled = true;
      p.expand_scaled = false;
      emulate_prep(p, &y);
      GroupedBuffers buf;
      emulate_shrink_expand(op, p, w, fwd, buf, &y);
    }
    if (c.launch_gather) emulate_gather(op, view, c, fwd, &y, accumulate, c.gather_shrink, true);
    for (size_t i = 0; i < y.writes.size(); ++i) {
      const std::string at = "y element (" + std::to_string(i / op.out) + ", " + std::to_string(i % op.out) + ")";
      CHECK(y.writes[i] <= 1, at + " was written twice");
      CHECK(accumulate || y.writes[i] == 1, at + " of the write-only forward was never written");
    }
    results["y"] = y.data;
    std::vector<double> plan_info = {c.mode.planned ? 1.0 : 0.0, static_cast<double>(c.mode.grouped_min),
                                     c.launch.fused ? 1.0 : 0.0, static_cast<double>(c.launch.k_splits),
                                     static_cast<double>(c.launch.n_tiles)};
    results["choice"] = plan_info;
  } else {
    op.grad_y = a.at("grad_y").f;
    const bool want_x = cfg.at(7) != 0;
    std::vector<double> acc_a = a.at("acc_a").f, acc_b = a.at("acc_b").f;
    const k::BackwardChoice bc = k::choose_backward(shape_of(op), op.mode, /*grads_f32=*/true);
    const k::Choice& c = bc.fwd;
    const k::PlanView view = resolve(op, c.build_plan, c.need_positions);
    CHECK(view.positions != nullptr, "the backward without a plan");
    Output gx(op.T, op.in, std::nan(""));
    const SE u_ops{&op.grad_y, op.out, &op.b_pool, &op.b_pages, op.Pb, &op.a_pool, &op.a_pages, op.Pa, op.in};
    const SE h_ops{&op.x, op.in, &op.a_pool, &op.a_pages, op.Pa, &op.b_pool, &op.b_pages, op.Pb, op.out};
    if (c.mode.grouped_min > 0) {
      GroupedBuffers us, hs;
      {  // u = B^T g (unscaled) and grad_x = scale A^T u
        const g::KSplit ks = g::choose_k_splits(op.T, op.R, op.out, op.sm_count);
        Workspace w;
        g::KernelParams p = grouped_params(op, view, c.mode.grouped_min, w, ks.splits, ks.length, 1);
        p.shrink_pages = op.b_pages.data();
        p.expand_pages = op.a_pages.data();
        p.num_shrink_pages = op.Pb;
        p.num_expand_pages = op.Pa;
        p.act_len = op.out;
        p.out_len = op.in;
        p.out = want_x ? &gx : nullptr;
        p.shrink_scaled = false;
        p.expand_scaled = true;
        emulate_prep(p, want_x ? &gx : nullptr);
        emulate_shrink_expand(op, p, w, u_ops, us, want_x ? &gx : nullptr);
      }
      {  // h = A x (unscaled)
        const g::KSplit ks = g::choose_k_splits(op.T, op.R, op.in, op.sm_count);
        Workspace w;
        g::KernelParams p = grouped_params(op, view, c.mode.grouped_min, w, ks.splits, ks.length, 1);
        p.shrink_pages = op.a_pages.data();
        p.expand_pages = op.b_pages.data();
        p.num_shrink_pages = op.Pa;
        p.num_expand_pages = op.Pb;
        p.act_len = op.in;
        p.out_len = op.out;
        p.out = nullptr;
        emulate_prep(p, nullptr);
        emulate_shrink_expand(op, p, w, h_ops, hs, nullptr);
      }
      auto grad_launch = [&](const std::vector<int32_t>& pages, int64_t np, const std::vector<int32_t>& other,
                             int64_t no, const std::vector<double>& coef, const std::vector<double>& v, int64_t len,
                             std::vector<double>& acc) {
        Workspace w;
        g::KernelParams p = grouped_params(op, view, c.mode.grouped_min, w, 1, 0, bc.grouped_grad_splits);
        p.shrink_pages = pages.data();
        p.expand_pages = other.data();
        p.num_shrink_pages = np;
        p.num_expand_pages = no;
        p.grad = &acc;  // only compared with null
        p.grad_len = len;
        emulate_prep(p, nullptr);
        emulate_grad(op, p, w, coef, v, acc, np);
      };
      grad_launch(op.a_pages, op.Pa, op.b_pages, op.Pb, us.hs, op.x, op.in, acc_a);
      grad_launch(op.b_pages, op.Pb, op.a_pages, op.Pa, hs.hs, op.grad_y, op.out, acc_b);
    }
    const std::vector<double> u = emulate_gather(op, view, c, u_ops, &gx, false, c.gather_shrink, want_x);
    if (c.gather_shrink) {
      k::Choice ch = c;
      ch.launch = bc.h_launch;
      const std::vector<double> h = emulate_gather(op, view, ch, h_ops, nullptr, false, true, false);
      emulate_segment_grad(op, view, c.mode, u, c.launch.fused ? 1 : c.launch.k_splits, op.x, op.a_pages, op.Pa,
                           op.b_pages, op.Pb, bc.grad_token_splits, acc_a);
      emulate_segment_grad(op, view, c.mode, h, ch.launch.fused ? 1 : ch.launch.k_splits, op.grad_y, op.b_pages,
                           op.Pb, op.a_pages, op.Pa, bc.grad_token_splits, acc_b);
    }
    if (want_x)
      for (size_t i = 0; i < gx.writes.size(); ++i)
        CHECK(gx.writes[i] == 1, "grad_x element (" + std::to_string(i / op.in) + ", " + std::to_string(i % op.in) +
                                     ") was written " + std::to_string(gx.writes[i]) + " times, not once");
    results["grad_x"] = gx.data;
    results["acc_a"] = acc_a;
    results["acc_b"] = acc_b;
  }
  write_arrays(out_path, results);
  return 0;
}

// ---- the self test: hostile plans, grids, splits, layouts

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }
  bool chance(double p) { return std::uniform_real_distribution<double>(0, 1)(gen) < p; }
};

// A plan from the builder, then damaged in one of several ways (or not).
void hostile_plan(Rng& rng, int64_t T, int64_t S, std::vector<int32_t>& token_slot, std::vector<int32_t>& order,
                  std::vector<int32_t>& seg, std::vector<int32_t>& positions) {
  build_plan(token_slot, S, order, seg);
  // Shuffle within segments (still a valid plan).
  for (int64_t s = 0; s < S; ++s)
    for (int64_t q = seg[s + 1] - 1; q > seg[s]; --q) std::swap(order[q], order[rng.uniform(seg[s], q)]);
  positions = plan_positions(order);
  const int64_t damage = rng.uniform(0, 9);
  for (int64_t n = 0; n < damage; ++n) {
    switch (rng.uniform(0, 7)) {
      case 0: if (T) order[rng.uniform(0, T - 1)] = static_cast<int32_t>(rng.uniform(-3, T + 3)); break;
      case 1: if (T) order[rng.uniform(0, T - 1)] = order[rng.uniform(0, T - 1)]; break;  // a repeat
      case 2: seg[rng.uniform(0, S)] = static_cast<int32_t>(rng.uniform(-3, T + 3)); break;
      case 3: if (T) positions[rng.uniform(0, T - 1)] = static_cast<int32_t>(rng.uniform(-3, T + 3)); break;
      case 4: if (T) token_slot[rng.uniform(0, T - 1)] = static_cast<int32_t>(rng.uniform(-3, S + 3)); break;
      case 5: positions = plan_positions(order); break;  // positions consistent with a damaged order
      case 6: if (S > 1) std::swap(seg[rng.uniform(1, S - 1)], seg[rng.uniform(1, S - 1)]); break;
      default: break;
    }
  }
}

void selftest_coverage(Rng& rng) {
  const int64_t T = rng.uniform(0, 70), S = rng.uniform(1, 9), R = rng.uniform(1, 6);
  std::vector<int32_t> token_slot(static_cast<size_t>(T)), ranks(static_cast<size_t>(S));
  for (auto& s : token_slot) s = static_cast<int32_t>(rng.chance(0.15) ? -1 : rng.uniform(0, S - 1));
  for (auto& r : ranks) r = static_cast<int32_t>(rng.chance(0.1) ? rng.uniform(-2, R + 2) : rng.uniform(0, R));
  std::vector<int32_t> order, seg, positions;
  hostile_plan(rng, T, S, token_slot, order, seg, positions);
  k::PlanView v{token_slot.data(), ranks.data(), order.data(), seg.data(), positions.data(), T, S, R};
  const int64_t grouped_mins[] = {0, 1, 3, 32};
  for (int64_t gm : grouped_mins) {
    for (bool planned : {true, false}) {
      if (!planned && gm > 0) continue;
      const k::GatherMode m{planned, planned ? k::kGatherTokens : 1, gm};
      std::vector<int> by_gather(static_cast<size_t>(T), 0), by_grouped(static_cast<size_t>(T), 0),
          by_grad(static_cast<size_t>(T), 0);
      for (int64_t b = 0; b < T; ++b) {
        int32_t s = -1;
        int64_t tok[k::kGatherTokens];
        bool has;
        if (planned) {
          has = k::gather_group<k::kGatherTokens>(v, m, b, &s, tok);
        } else {
          int64_t one[1];
          has = k::gather_group<1>(v, m, b, &s, one);
          for (int i = 0; i < k::kGatherTokens; ++i) tok[i] = i == 0 ? one[0] : -1;
        }
        if (!has) continue;
        CHECK(s >= 0 && s < S, "a gather block's slot out of range");
        for (int64_t t : tok) {
          if (t < 0) continue;
          CHECK(t < T, "a gather block's token out of range");
          CHECK(k::slot_of_token(v, t) == s, "a gather block took a token of another slot");
          ++by_gather[t];
        }
      }
      // The grouped path: accepted segments write their positions' tokens, rejected ones zero them.
      for (int32_t s = 0; s < S; ++s) {
        k::Segment sg;
        if (!k::grouped_wants(v, m, s, &sg)) continue;
        bool ok = true;
        for (int64_t q = sg.begin; q < sg.end; ++q) ok = ok && k::grouped_position_ok(v, s, q);
        for (int64_t q = sg.begin; q < sg.end; ++q) {
          if (ok) {
            int32_t sq;
            k::Segment gq;
            const int64_t t = k::trusted_token(v, q, &sq, &gq);
            CHECK(t >= 0 && sq == s, "an accepted segment holds an untrusted position");
            ++by_grouped[t];
          } else {
            int32_t sq;
            k::Segment gq;
            const int64_t t = k::trusted_token(v, q, &sq, &gq);
            if (t >= 0 && sq == s) ++by_grouped[t];  // prep_zero_token
          }
        }
      }
      // The pool-gradient sums (planned view, as the backward always has one).
      for (int32_t s = 0; s < S; ++s) {
        const k::Segment sg = k::segment_of_slot(v, s);
        if (k::grouped_owns(m, sg) || k::rank_of_slot(v, s) == 0) continue;
        const int64_t splits = rng.uniform(1, 5);
        for (int64_t z = 0; z < splits; ++z) {
          const k::PositionRange pr = k::split_range(sg, z, splits, 1);
          for (int64_t q = pr.begin; q < pr.end; ++q) {
            const int64_t t = k::segment_grad_token(v, m, s, q);
            if (t >= 0) ++by_grad[t];
          }
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const k::Owner o = k::token_owner(v, m, t);
        CHECK(by_gather[t] == (o == k::Owner::kGather ? 1 : 0), "a gather-owned token not handled exactly once");
        CHECK(by_grouped[t] == (o == k::Owner::kGrouped ? 1 : 0), "a grouped-owned token not written exactly once");
        // One block per token (unplanned) handles a token whatever the plan holds; its pool
        // gradients are summed only at its trusted position (none in a damaged plan).
        const int32_t q = positions[t];
        int32_t sq;
        k::Segment gq;
        const bool trusted = q >= 0 && q < T && k::trusted_token(v, q, &sq, &gq) == t;
        CHECK(by_grad[t] == (o == k::Owner::kGather && (planned || trusted) ? 1 : 0),
              "a gather-owned token not summed exactly once");
      }
    }
  }
}

void selftest_valid_plans_cover_everything(Rng& rng) {
  // With a plan from the builder every token with a slot and a rank has an owner.
  const int64_t T = rng.uniform(1, 200), S = rng.uniform(1, 12), R = 4;
  std::vector<int32_t> token_slot(static_cast<size_t>(T)), ranks(static_cast<size_t>(S));
  for (auto& s : token_slot) s = static_cast<int32_t>(rng.uniform(-1, S - 1));
  for (auto& r : ranks) r = static_cast<int32_t>(rng.uniform(0, R));
  std::vector<int32_t> order, seg;
  build_plan(token_slot, S, order, seg);
  const std::vector<int32_t> positions = plan_positions(order);
  k::PlanView v{token_slot.data(), ranks.data(), order.data(), seg.data(), positions.data(), T, S, R};
  for (int64_t gm : {0, 1, 5, 32})
    for (bool planned : {true, false}) {
      if (!planned && gm > 0) continue;
      const k::GatherMode m{planned, planned ? k::kGatherTokens : 1, gm};
      for (int64_t t = 0; t < T; ++t) {
        const int32_t s = token_slot[t];
        const bool has_adapter = s >= 0 && ranks[s] > 0;
        CHECK((k::token_owner(v, m, t) != k::Owner::kNone) == has_adapter, "a valid token without an owner");
      }
    }
}

void selftest_launch_shapes(Rng& rng) {
  const int64_t groups = rng.uniform(1, 3000), in = rng.uniform(1, 600) * 8, out = rng.uniform(1, 600) * 8;
  const int vec = rng.chance(0.5) ? 8 : (rng.chance(0.5) ? 4 : 1);
  const int sms = static_cast<int>(rng.uniform(1, 200));
  const k::GatherLaunch L = k::gather_launch(groups, in, out, vec, sms, rng.chance(0.1));
  CHECK(L.k_splits >= 1 && L.k_splits <= 65535 && L.n_tiles >= 1 && L.n_tiles <= 65535, "grid splits out of range");
  CHECK(L.expand_threads >= 32 && L.expand_threads <= 128 && L.expand_threads % 32 == 0, "expand block size");
  if (!L.fused) {
    CHECK(L.k_chunk % (32 * vec) == 0 && L.n_chunk % (32 * vec) == 0, "split chunks off the 16-byte step");
    CHECK(L.k_chunk * L.k_splits >= in && L.k_chunk * (L.k_splits - 1) < in, "K splits do not cover in exactly");
    CHECK(L.n_chunk * L.n_tiles >= out && L.n_chunk * (L.n_tiles - 1) < out, "N tiles do not cover out exactly");
    const int64_t want = (2 * sms + groups - 1) / groups;
    const int64_t most = std::min<int64_t>((in + 32 * vec - 1) / (32 * vec), k::kMaxKSplits);
    CHECK(2 * L.k_splits >= std::min(want, most), "few groups are not split to fill the GPU");
  } else {
    CHECK(L.k_splits == 1 && L.n_tiles == 1 && L.k_chunk >= in && L.n_chunk >= out, "a fused launch is unsplit");
  }
  const int64_t T = rng.uniform(1, 5000), R = rng.uniform(1, 1024);
  const g::KSplit ks = g::choose_k_splits(T, R, in, sms);
  CHECK(ks.splits >= 1 && ks.splits <= 16, "k splits out of range");
  CHECK(ks.splits == 1 || ks.length % 32 == 0, "a split length off the k-tile");
  CHECK(ks.length * ks.splits >= in && ks.length * (ks.splits - 1) < in, "the K splits do not cover in exactly");
  for (int32_t q = 0; q < ks.splits; ++q)
    CHECK(g::shrink_problem(true, 5, 3, in, q, ks.length).k > 0, "an empty K split");
  const int64_t S = rng.uniform(1, 300);
  const int32_t gs = static_cast<int32_t>(rng.uniform(1, 64));
  const g::Workspace w = g::workspace_layout(T, S, R, ks.splits, gs, rng.chance(0.5), 2);
  const size_t parts[] = {w.shrink_sizes, w.expand_sizes, w.grad_sizes, w.seg_begin, w.grad_pos, w.tokens,
                          w.shrink_idx, w.expand_idx, w.partial, w.hs, w.total};
  for (size_t i = 0; i + 1 < sizeof(parts) / sizeof(parts[0]); ++i) {
    CHECK(parts[i] % g::kWorkspaceAlign == 0, "a workspace part off 256-byte alignment");
    CHECK(parts[i] <= parts[i + 1], "workspace parts out of order");
  }
  const size_t W = static_cast<size_t>(k::grouped_hs_width(R));
  CHECK(w.expand_sizes - w.shrink_sizes >= sizeof(g::ProblemSize) * S * ks.splits, "shrink sizes overlap");
  CHECK(w.tokens - w.grad_pos >= sizeof(int32_t) * S * gs, "grad positions overlap");
  CHECK(w.expand_idx - w.shrink_idx >= sizeof(int32_t) * S * W, "shrink indices overlap");
  CHECK(ks.splits == 1 || w.hs - w.partial >= sizeof(float) * ks.splits * T * W, "partial sums overlap");
  // Token ranges of a segment: disjoint, covering, in granules.
  const k::Segment sg{rng.uniform(0, 100), 0};
  const k::Segment seg{sg.begin, sg.begin + rng.uniform(0, 3000)};
  const int64_t splits = rng.uniform(1, 70), granule = rng.chance(0.5) ? 1 : 32;
  int64_t at = seg.begin;
  for (int64_t z = 0; z < splits; ++z) {
    const k::PositionRange pr = k::split_range(seg, z, splits, granule);
    CHECK(pr.begin == at || pr.begin == pr.end, "token ranges not contiguous");
    CHECK(pr.begin == pr.end || (pr.begin - seg.begin) % granule == 0, "a token range off its granule");
    if (pr.end > pr.begin) at = pr.end;
  }
  CHECK(at == seg.end || seg.length() == 0, "token ranges do not cover the segment");
  // Expand gather indices: padding repeats page 0.
  const int32_t pages[] = {11, 12, 13};
  for (int64_t kk = 0; kk < g::expand_k(3); ++kk) CHECK(g::expand_index(pages, 3, kk) == (kk < 3 ? pages[kk] : 11), "expand padding");
}

// The dispatch rule over random call shapes: the grouped GEMM only where it can run and some
// segment may reach its threshold; plans and positions exactly when the kernels need them.
void selftest_dispatch(Rng& rng) {
  k::OpShape s{};
  s.num_tokens = rng.uniform(1, 9000);
  s.num_slots = rng.uniform(1, 1100);
  s.max_rank = rng.chance(0.1) ? rng.uniform(1025, 4096) : rng.uniform(1, 128);
  s.in_features = rng.uniform(1, 2000) * 8;
  s.out_features = rng.uniform(1, 2000) * 8;
  s.max_segment = rng.chance(0.5) ? -1 : rng.uniform(0, s.num_tokens);
  s.sm_count = static_cast<int>(rng.uniform(1, 200));
  s.vec = rng.chance(0.5) ? 8 : 1;
  s.half_precision = rng.chance(0.7);
  s.has_plan = rng.chance(0.6);
  s.has_positions = s.has_plan && rng.chance(0.7);
  s.grouped_compiled = rng.chance(0.9);
  s.grouped_aligned = rng.chance(0.9);
  const k::KernelMode mode = static_cast<k::KernelMode>(rng.uniform(0, 3));
  const bool write_only = rng.chance(0.5);
  const k::Choice c = k::choose_forward(s, mode, write_only);
  const bool grouped = c.mode.grouped_min > 0;
  CHECK(!grouped || (s.half_precision && s.grouped_compiled && s.grouped_aligned && s.max_rank <= k::kGatherMaxRank),
        "the grouped GEMM chosen where it cannot run");
  CHECK(!grouped || (mode != k::KernelMode::kGather && mode != k::KernelMode::kFallback), "grouped against the mode");
  CHECK(!(mode == k::KernelMode::kAuto && s.max_segment >= 0 && s.max_segment < k::kGroupedMinSegment) || !grouped,
        "a grouped launch although every segment is shorter than its threshold");
  CHECK(!(mode == k::KernelMode::kAuto && s.max_segment >= k::kGroupedMinSegment && s.half_precision &&
          s.grouped_compiled && s.grouped_aligned && s.max_rank <= k::kGatherMaxRank) || grouped,
        "no grouped launch although a segment reaches its threshold");
  CHECK(!grouped || c.mode.planned, "the grouped GEMM without a plan");
  CHECK(c.mode.tokens == (c.mode.planned ? k::kGatherTokens : 1), "tokens per gather group");
  CHECK(c.build_plan == (c.mode.planned && !s.has_plan), "a plan built when not needed, or missing");
  CHECK(c.need_positions == (c.mode.planned && (c.build_plan || !s.has_positions)), "positions computed wrongly");
  CHECK(!write_only || c.launch_gather, "a write-only call without the kernels that zero unowned rows");
  CHECK(mode != k::KernelMode::kFallback || (!c.mode.planned && c.launch.fused), "the fallback mode is not the simplest");
  CHECK(!(s.max_rank > k::kGatherMaxRank) || !c.mode.planned, "a wide page table in planned groups");
  const k::BackwardChoice b = k::choose_backward(s, mode, rng.chance(0.5));
  CHECK(b.fwd.build_plan == !s.has_plan && b.fwd.need_positions == (!s.has_plan || !s.has_positions),
        "the backward without its plan");
  CHECK(b.grad_token_splits >= 1 && b.grad_token_splits <= 64 && b.grouped_grad_splits >= 1 &&
            b.grouped_grad_splits <= 64,
        "gradient splits out of range");
  CHECK(b.fwd.launch.k_chunk >= 1 && b.h_launch.k_chunk >= 1, "empty shrink chunks");
}

int selftest(uint64_t seed, int64_t rounds) {
  Rng rng(seed);
  for (int64_t n = 0; n < rounds; ++n) {
    selftest_coverage(rng);
    selftest_valid_plans_cover_everything(rng);
    selftest_launch_shapes(rng);
    selftest_dispatch(rng);
  }
  std::printf("selftest ok: %lld rounds\n", static_cast<long long>(rounds));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "selftest") == 0) return selftest(std::strtoull(argv[2], nullptr, 10), std::atoll(argv[3]));
  if (argc == 4 && std::strcmp(argv[1], "emulate") == 0) return emulate(argv[2], argv[3]);
  std::fprintf(stderr, "usage: %s selftest SEED ROUNDS | emulate IN OUT\n", argv[0]);
  return 2;
}
