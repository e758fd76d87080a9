// Batch Group Normalization on CPU: fused kernels and a closed-form backward in one C++ op.
//
// Built on first use by bgn_lightning/_ext.py (torch.utils.cpp_extension.load); the Python
// path in bgn_lightning/_autograd.py is the fallback and the reference. Notation as there:
// x is (N, C, *S) with S = prod(spatial), D = C * S features per sample, G groups of L = D / G
// consecutive features. Cells are runs of R = gcd(L, S) features: every cell lies in one group
// and one channel; channel c has k = S / R cells, group g has L / R cells, and there are U = C * k.
//
// Ghost batches: with a chunk size B < N (`chunk` of `train`), the batch is K = ceil(N / B) chunks
// of B consecutive samples (the last one has N - (K - 1) * B), each normalized with its own
// per-group statistics. Every per-cell / per-group table then has K rows (index kk * U + u or
// kk * G + grp); the passes over the activation are the same, each sample adding into (reading
// from) its chunk's row. B = N (K = 1) is plain batch statistics. When whole chunks keep the threads
// busy (ChunkPlan::fits: always with one thread) the chunks run one at a time instead (ChunkPlan):
// the plain algorithm on each chunk's samples, with tables of one chunk reused in cache.
//
// Memory: a contiguous x is (N, U, R) with each cell run contiguous; a channels-last x is
// (N, S, C) rows, and element (n, p, c) belongs to cell c * k + p / R.
//
// Passes over the activation (as nn.BatchNorm2d): forward = 1 read for the statistics (shifted
// sums: short float runs, added in double) + 1 read and 1 write to normalize; backward = 1 read of
// (dy, x) for the cell sums + 1 read of (dy, x) and 1 write for dx, with or without chunks (chunk
// at a time, a chunk's second pass finds it in cache). Everything else is O(K * U) scalar work, so
// small inputs pay no per-op overhead.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kGrain = 32768;  // elements per parallel task, as ATen's internal::GRAIN_SIZE

// Samples per chunk: `chunk` <= 0 or >= N means one chunk, the whole batch.
int64_t chunk_size(int64_t chunk, int64_t N) { return chunk <= 0 || chunk >= N ? N : chunk; }

struct Geometry {
  int64_t N, C, S, G, L, R, k, U, cpg, B, K;
  bool channels_last;
  // Per cell u: its group, its channel and its slot (u % k) * C + u / k in a channels-last (k, C)
  // table, looked up (not divided) in the O(K * U) loops.
  std::vector<int64_t> group_u, channel_u, slot_u;

  Geometry(const Tensor& x, int64_t groups, bool cl, int64_t chunk = 0) : G(groups), channels_last(cl) {
    N = x.size(0);
    C = x.size(1);
    S = 1;
    for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
    L = C * S / G;
    R = std::gcd(L, S);
    k = S / R;
    U = C * k;
    cpg = L / R;
    B = chunk_size(chunk, N);
    K = B > 0 ? (N + B - 1) / B : 1;
    group_u.resize(U);
    channel_u.resize(U);
    slot_u.resize(U);
    for (int64_t u = 0; u < U; ++u) {
      group_u[u] = u / cpg;
      channel_u[u] = u / k;
      slot_u[u] = (u % k) * C + u / k;
    }
  }
  // Values per group in chunk kk.
  double count(int64_t kk) const { return static_cast<double>((std::min(N, (kk + 1) * B) - kk * B) * L); }
  // Shapes the Python layer already validated; checked again so a bad call cannot corrupt memory.
  // Returns the values per group in the batch, N * C * prod(S) / G.
  static int64_t check(const Tensor& x, int64_t groups) {
    TORCH_CHECK(x.dim() >= 2 && x.size(1) > 0, "batch_group_norm: expected input of shape (N, C, *S), got ",
                x.sizes());
    int64_t features = 1;
    for (int64_t d = 1; d < x.dim(); ++d) features *= x.size(d);
    TORCH_CHECK(groups > 0 && groups <= features && features % groups == 0,
                "batch_group_norm: num_groups=", groups, " must divide C*prod(S) for input ", x.sizes());
    return x.size(0) * (features / groups);
  }
  int64_t group_of(int64_t u) const { return group_u[u]; }
  int64_t channel_of(int64_t u) const { return channel_u[u]; }
};

bool is_channels_last(const Tensor& x) {
  if (x.is_contiguous()) return false;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

at::MemoryFormat format_of(const Tensor& x, bool cl) {
  if (!cl) return at::MemoryFormat::Contiguous;
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

// Element loads and stores in opmath_t. bfloat16 converts with plain bit operations, which the
// compiler vectorizes (c10::BFloat16's own conversions do not vectorize in these loops); the store
// rounds to nearest even and keeps NaN a NaN, as c10 does.
template <typename scalar_t>
inline at::opmath_type<scalar_t> load(const scalar_t* p, int64_t i) {
  return static_cast<at::opmath_type<scalar_t>>(p[i]);
}
template <>
inline float load<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
template <typename scalar_t>
inline void store(scalar_t* p, int64_t i, at::opmath_type<scalar_t> value) {
  p[i] = static_cast<scalar_t>(value);
}
template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, int64_t i, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i].x = value != value ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// Sums of one contiguous run of R values: s1 = sum(f1), s2 = sum(f2) for (f1, f2) = op(x, y, shift).
// Blocks of kBlock values add up in opmath_t (vector-width float work for float input), the blocks
// in double.
template <typename scalar_t, typename Op>
inline void run_sums(const scalar_t* px, const scalar_t* py, int64_t R, at::opmath_type<scalar_t> shift,
                     const Op& op, double& s1, double& s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kBlock = 256;
  double a1 = 0.0, a2 = 0.0;
  for (int64_t j0 = 0; j0 < R; j0 += kBlock) {
    const int64_t j1 = std::min(R, j0 + kBlock);
    opmath_t f1 = 0, f2 = 0;
#pragma omp simd reduction(+ : f1, f2)
    for (int64_t j = j0; j < j1; ++j) {
      auto v = op(load(px, j), load(py, j), shift);
      f1 += v.first;
      f2 += v.second;
    }
    a1 += f1;
    a2 += f2;
  }
  s1 = a1;
  s2 = a2;
}

// Channels-last rows r0 .. r1 - 1 of C values (x + r * C), all in one segment (the same cells):
// s1[c] += sum(f1), s2[c] += sum(f2). Rows add into the opmath_t partial sums p1, p2 (C each),
// flushed to double every kFlush rows and at the end. `y` may be null.
template <typename scalar_t, typename Op>
inline void segment_sums(const scalar_t* x, const scalar_t* y, int64_t r0, int64_t r1, int64_t C,
                         const at::opmath_type<scalar_t>* sh, const Op& op, at::opmath_type<scalar_t>* p1,
                         at::opmath_type<scalar_t>* p2, double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kFlush = 32;
  for (int64_t r = r0; r < r1;) {
    const int64_t block_end = std::min(r1, r + kFlush);
    std::fill(p1, p1 + C, opmath_t(0));
    std::fill(p2, p2 + C, opmath_t(0));
    for (; r < block_end; ++r) {
      const scalar_t* px = x + r * C;
      const scalar_t* py = y ? y + r * C : px;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        auto v = op(load(px, c), load(py, c), sh[c]);
        p1[c] += v.first;
        p2[c] += v.second;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += static_cast<double>(p1[c]);
      s2[c] += static_cast<double>(p2[c]);
    }
  }
}

// n values of one cell run (a, b, c scalars) or of one channels-last row (a, b, c tables of n):
// out = a * x + b (y == null) or a * y + c * x + b.
template <typename scalar_t>
inline void affine_run(const scalar_t* px, const scalar_t* py, scalar_t* po, int64_t n,
                       at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> c, at::opmath_type<scalar_t> b) {
  if (py) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store(po, j, a * load(py, j) + c * load(px, j) + b);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store(po, j, a * load(px, j) + b);
  }
}
template <typename scalar_t>
inline void affine_row(const scalar_t* px, const scalar_t* py, scalar_t* po, int64_t n,
                       const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* c,
                       const at::opmath_type<scalar_t>* b) {
  if (py) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store(po, j, a[j] * load(py, j) + c[j] * load(px, j) + b[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store(po, j, a[j] * load(px, j) + b[j]);
  }
}

// Per-cell sums over each chunk: a[kk * U + u] = sum(f1), b[kk * U + u] = sum(f2) where
// (f1, f2) = op(x, y, cell_shift[u]) for the elements of cell u in the samples of chunk kk (one shift
// per cell for every chunk: the tables of K rows are the outputs only). `op` is generic and runs in opmath_t (float for float, bfloat16 and
// half input; double for double) on short runs whose partial sums are added in double; the
// values are shifted (by a group's first value, or its mean), so short float sums lose nothing
// that matters. `cell_shift` must be representable in opmath_t. `y` may be null (statistics).
template <typename scalar_t, typename Op>
void cell_sums(const Geometry& g, const scalar_t* x, const scalar_t* y, const double* cell_shift,
               std::vector<double>& a, std::vector<double>& b, const Op& op) {
  a.assign(g.K * g.U, 0.0);
  b.assign(g.K * g.U, 0.0);
  using opmath_t = at::opmath_type<scalar_t>;
  if (!g.channels_last) {
    const int64_t items = g.N * g.U;
    std::vector<double> part(2 * items);
    at::parallel_for(0, items, std::max<int64_t>(1, kGrain / g.R), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* px = x + i * g.R;
        run_sums(px, y ? y + i * g.R : px, g.R, static_cast<opmath_t>(cell_shift[i % g.U]), op, part[2 * i],
                 part[2 * i + 1]);
      }
    });
    for (int64_t n = 0; n < g.N; ++n) {
      const double* p = part.data() + 2 * n * g.U;
      double* pa = a.data() + (n / g.B) * g.U;  // one division per sample
      double* pb = b.data() + (n / g.B) * g.U;
      for (int64_t u = 0; u < g.U; ++u) {
        pa[u] += p[2 * u];
        pb[u] += p[2 * u + 1];
      }
    }
    return;
  }
  // Channels-last: rows of C values; accumulators laid out (k, C) per task and chunk the task
  // touches (a task's rows span chunks first[t] .. first[t] + spans[t] - 1), summed at the end.
  // Segments never cross a sample, so never a chunk.
  const int64_t rows = g.N * g.S;
  const int64_t width = g.k * g.C;
  const int64_t grain = std::max<int64_t>(1, kGrain / g.C);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
  const int64_t per_task = (rows + tasks - 1) / tasks;
  std::vector<int64_t> first(tasks, 0), offset(tasks + 1, 0);
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t r0 = t * per_task, r1 = std::min(rows, r0 + per_task);
    int64_t span = 1;
    if (r0 < r1) {
      first[t] = (r0 / g.S) / g.B;
      span = ((r1 - 1) / g.S) / g.B - first[t] + 1;
    }
    offset[t + 1] = offset[t] + span;
  }
  std::vector<double> acc(2 * offset[tasks] * width, 0.0);
  std::vector<opmath_t> shift_t(width);  // (k, C) layout
  for (int64_t u = 0; u < g.U; ++u) shift_t[g.slot_u[u]] = static_cast<opmath_t>(cell_shift[u]);
  at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
    const int64_t C = g.C;
    std::vector<opmath_t> part(2 * C);
    opmath_t* p1 = part.data();
    opmath_t* p2 = p1 + C;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r_end = std::min(rows, (t + 1) * per_task);
      for (int64_t r = t * per_task; r < r_end;) {
        // Rows up to the end of this segment share their cells (and their sample's chunk).
        const int64_t p = r % g.S, seg = p / g.R, kk = (r / g.S) / g.B;
        const int64_t stop = std::min(r_end, r + g.R - p % g.R);
        double* a1 = acc.data() + 2 * (offset[t] + kk - first[t]) * width;
        segment_sums(x, y, r, stop, C, shift_t.data() + seg * C, op, p1, p2, a1 + seg * C, a1 + width + seg * C);
        r = stop;
      }
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t j = 0; j < offset[t + 1] - offset[t]; ++j) {
      const double* a1 = acc.data() + 2 * (offset[t] + j) * width;
      const double* a2 = a1 + width;
      double* pa = a.data() + (first[t] + j) * g.U;
      double* pb = b.data() + (first[t] + j) * g.U;
      for (int64_t s = 0; s < g.k; ++s) {
        for (int64_t c = 0; c < g.C; ++c) {
          pa[c * g.k + s] += a1[s * g.C + c];
          pb[c * g.k + s] += a2[s * g.C + c];
        }
      }
    }
  }
}

// out = alpha[u] * x + beta[u] (y == null) or alpha[u] * y + gamma[u] * x + beta[u], per cell, with
// the tables' row of the sample's chunk (index kk * U + u).
template <typename scalar_t>
void cell_affine(const Geometry& g, const scalar_t* x, const scalar_t* y, scalar_t* out,
                 const std::vector<double>& alpha, const std::vector<double>& gamma,
                 const std::vector<double>& beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (!g.channels_last) {
    const int64_t items = g.N * g.U;
    at::parallel_for(0, items, std::max<int64_t>(1, kGrain / g.R), [&](int64_t begin, int64_t end) {
      int64_t n = begin / g.U, cell = begin - n * g.U;  // item i is (sample n, cell)
      int64_t row = (n / g.B) * g.U;                    // the sample's chunk's row in the tables
      for (int64_t i = begin; i < end; ++i) {
        const int64_t u = row + cell;
        if (++cell == g.U) {
          cell = 0;
          row = (++n / g.B) * g.U;
        }
        affine_run(x + i * g.R, y ? y + i * g.R : nullptr, out + i * g.R, g.R, static_cast<opmath_t>(alpha[u]),
                   y ? static_cast<opmath_t>(gamma[u]) : opmath_t(0), static_cast<opmath_t>(beta[u]));
      }
    });
    return;
  }
  const int64_t width = g.k * g.C;
  std::vector<opmath_t> at_(g.K * width), bt(g.K * width), ct(y ? g.K * width : 0);  // (K, k, C)
  for (int64_t kk = 0; kk < g.K; ++kk) {
    for (int64_t s = 0; s < g.k; ++s) {  // slot s * C + c holds cell u = c * k + s: strided reads
      const int64_t j = kk * width + s * g.C, i = kk * g.U + s;
      for (int64_t c = 0; c < g.C; ++c) {
        at_[j + c] = static_cast<opmath_t>(alpha[i + c * g.k]);
        bt[j + c] = static_cast<opmath_t>(beta[i + c * g.k]);
        if (y) ct[j + c] = static_cast<opmath_t>(gamma[i + c * g.k]);
      }
    }
  }
  const int64_t rows = g.N * g.S;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / g.C), [&](int64_t begin, int64_t end) {
    int64_t n = begin / g.S, pos = begin - n * g.S;  // row r is (sample n, position pos)
    int64_t row = (n / g.B) * width;                 // the sample's chunk's row in the tables
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = row + (pos / g.R) * g.C;
      if (++pos == g.S) {
        pos = 0;
        row = (++n / g.B) * width;
      }
      affine_row(x + r * g.C, y ? y + r * g.C : nullptr, out + r * g.C, g.C, at_.data() + off,
                 y ? ct.data() + off : nullptr, bt.data() + off);
    }
  });
}

// a * b + c, fused where the target has FMA: what the compiler's contraction of `c += a * b` gives,
// which an in-order vectorized reduction would not (so sums match the scalar loops bit for bit).
inline double mul_add(double a, double b, double c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// A 1-D vector (weight, bias, statistics) as doubles; `fill` everywhere when undefined.
std::vector<double> channel_vector(const Tensor& t, int64_t size, double fill) {
  std::vector<double> out(size, fill);
  if (!t.defined()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "bgn_vector", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.dim() == 1 ? t.stride(0) : 1;
    for (int64_t i = 0; i < size; ++i) out[i] = static_cast<double>(p[i * stride]);
  });
  return out;
}

// Batch statistics: per-(chunk, group) mean and biased variance (double, index kk * G + grp), from
// shifted sums.
template <typename scalar_t>
void group_moments(const Geometry& g, const scalar_t* x, std::vector<double>& mean, std::vector<double>& var) {
  // Shift every group by its first value in sample 0 (every chunk alike), so large means do not cancel.
  std::vector<double> shift_g(g.G), shift_u(g.U);
  for (int64_t grp = 0; grp < g.G; ++grp) {
    const int64_t f = grp * g.L;
    const int64_t off = g.channels_last ? (f % g.S) * g.C + f / g.S : f;
    shift_g[grp] = static_cast<double>(x[off]);
  }
  for (int64_t u = 0; u < g.U; ++u) shift_u[u] = shift_g[g.group_of(u)];
  std::vector<double> s1, s2;
  cell_sums<scalar_t>(g, x, nullptr, shift_u.data(), s1, s2, [](auto v, auto, auto sh) {
    const auto d = v - sh;
    return std::make_pair(d, d * d);
  });
  if (g.U == g.G) {  // cells are the groups: the sums are the statistics' sums
    mean.swap(s1);
    var.swap(s2);
  } else {
    mean.assign(g.K * g.G, 0.0);
    var.assign(g.K * g.G, 0.0);
    for (int64_t kk = 0; kk < g.K; ++kk) {
      double* pm = mean.data() + kk * g.G;
      double* pv = var.data() + kk * g.G;
      const double* p1 = s1.data() + kk * g.U;
      const double* p2 = s2.data() + kk * g.U;
      for (int64_t grp = 0; grp < g.G; ++grp) {  // a group's cells are consecutive
        double a1 = 0.0, a2 = 0.0;
        for (int64_t u = grp * g.cpg; u < (grp + 1) * g.cpg; ++u) {
          a1 += p1[u];
          a2 += p2[u];
        }
        pm[grp] = a1;
        pv[grp] = a2;
      }
    }
  }
  for (int64_t kk = 0; kk < g.K; ++kk) {
    double* pm = mean.data() + kk * g.G;
    double* pv = var.data() + kk * g.G;
    const double count = g.count(kk);
#pragma omp simd
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const double m = pm[grp] / count;
      pv[grp] = std::max(pv[grp] / count - m * m, 0.0);
      pm[grp] = shift_g[grp] + m;
    }
  }
}

// 1 / sqrt(var + eps), elementwise (outside AT_DISPATCH, whose macro arguments cannot hold a pragma).
std::vector<double> inverse_std(const std::vector<double>& var, double eps) {
  std::vector<double> out(var.size());
  const double* v = var.data();
  double* o = out.data();
  const int64_t size = static_cast<int64_t>(var.size());
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) o[i] = 1.0 / std::sqrt(v[i] + eps);
  return out;
}

// A 0-element tensor stands for an absent weight or bias inside the autograd function.
Tensor optional_param(const Tensor& t) { return t.numel() == 0 ? Tensor() : t; }

// The running statistics' targets from per-(chunk, group) mean and biased variance (index
// kk * G + grp): the batch mean and unbiased variance. With chunks (g.K > 1): chunk 0's (what DDP
// keeps with rank 0's buffers broadcast), or with `average` the mean over chunks of each chunk's
// mean and unbiased variance (each unbiased with its own count).
void running_targets(const Geometry& g, const double* mean, const double* var, bool average,
                     std::vector<double>& target_mean, std::vector<double>& target_var) {
  target_mean.resize(g.G);
  target_var.resize(g.G);
  const int64_t used = average ? g.K : 1;
  for (int64_t kk = 0; kk < used; ++kk) {
    const double count = g.count(kk), unbias = count / (count - 1.0);
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const double m = mean[kk * g.G + grp], v = var[kk * g.G + grp] * unbias;
      target_mean[grp] = kk == 0 ? m : target_mean[grp] + m;
      target_var[grp] = kk == 0 ? v : target_var[grp] + v;
    }
  }
  if (used > 1) {
    for (int64_t grp = 0; grp < g.G; ++grp) {
      target_mean[grp] /= static_cast<double>(used);
      target_var[grp] /= static_cast<double>(used);
    }
  }
}

// Running statistics (in place): lerp towards the targets.
void update_running(const Tensor& running_mean, const Tensor& running_var, const std::vector<double>& target_mean,
                    const std::vector<double>& target_var, double factor) {
  for (const auto& [buffer, values] :
       {std::make_pair(running_mean, &target_mean), std::make_pair(running_var, &target_var)}) {
    if (buffer.dim() != 1 || buffer.stride(0) != 1) {  // unusual buffer: plain tensor ops
      Tensor v = at::empty({(int64_t)values->size()}, at::TensorOptions().dtype(at::kDouble));
      std::copy(values->begin(), values->end(), v.data_ptr<double>());
      buffer.lerp_(v.to(buffer.scalar_type()), factor);
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buffer.scalar_type(), "bgn_running", [&] {
      scalar_t* p = buffer.mutable_data_ptr<scalar_t>();
      for (size_t i = 0; i < values->size(); ++i) {
        const double old = static_cast<double>(p[i]);
        p[i] = static_cast<scalar_t>(old + factor * ((*values)[i] - old));
      }
    });
    buffer.unsafeGetTensorImpl()->bump_version();  // an in-place update, as lerp_ would record
  }
}

// Channels-last rows of at most kTile channels in the chunk-at-a-time passes: channels 0 .. width - 1
// of rows r0 .. r1 - 1 (x + r * C), with the partial sums (tile_sums) or tables (tile_affine) in
// registers over the rows, where segment_sums / affine_row go through memory for every row.
// tile_sums adds as segment_sums does (rows into opmath_t, flushed to double every kRows rows).
constexpr int64_t kTile = 64, kRows = 32;
template <int64_t W, typename scalar_t, typename Op>
inline void tile_sums(const scalar_t* x, const scalar_t* y, int64_t r0, int64_t r1, int64_t C, int64_t width,
                      const at::opmath_type<scalar_t>* sh, const Op& op, double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kFlush = kRows;
  const int64_t n = W > 0 ? W : width;
  opmath_t p1[kTile], p2[kTile], shift[kTile];
  for (int64_t c = 0; c < n; ++c) shift[c] = sh[c];
  const scalar_t* yy = y ? y : x;
  for (int64_t r = r0; r < r1;) {
    const int64_t block_end = std::min(r1, r + kFlush);
    for (int64_t c = 0; c < n; ++c) p1[c] = p2[c] = opmath_t(0);
    for (; r < block_end; ++r) {
      const scalar_t* px = x + r * C;
      const scalar_t* py = yy + r * C;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        auto v = op(load(px, c), load(py, c), shift[c]);
        p1[c] += v.first;
        p2[c] += v.second;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      s1[c] += static_cast<double>(p1[c]);
      s2[c] += static_cast<double>(p2[c]);
    }
  }
}
template <int64_t W, typename scalar_t>
inline void tile_affine(const scalar_t* x, const scalar_t* y, scalar_t* out, int64_t r0, int64_t r1, int64_t C,
                        int64_t width, const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* c,
                        const at::opmath_type<scalar_t>* b) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = W > 0 ? W : width;
  opmath_t ta[kTile], tb[kTile], tc[kTile];
  for (int64_t j = 0; j < n; ++j) {
    ta[j] = a[j];
    tb[j] = b[j];
    tc[j] = y ? c[j] : opmath_t(0);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* px = x + r * C;
    scalar_t* po = out + r * C;
    if (y) {
      const scalar_t* py = y + r * C;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) store(po, j, ta[j] * load(py, j) + tc[j] * load(px, j) + tb[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) store(po, j, ta[j] * load(px, j) + tb[j]);
    }
  }
}

// Ghost batches one chunk at a time. With many small chunks the K-row tables above cost as much as
// the passes over the activation; here each chunk runs the plain algorithm on its own samples:
// statistics pass, O(U) tables, normalize pass (backward: sums pass, O(U) tables, dx pass), with
// tables of U entries reused from chunk to chunk (in cache) and laid out as the passes read them
// (position p: cell p of contiguous input, slot (u % k) * C + u / k of channels-last input), and
// the chunk's activation still in cache for its second pass. With one cell per group (cpg = 1: G a
// multiple of C) every table step is a vector loop over positions; otherwise over groups, with
// lookups between the two. A chunk's statistics are those of a plain call on its samples (shifted
// by its own first values, its own mean), up to rounding. Whole chunks are split among parallel
// tasks, each with its own buffers.
//
// Saved for the backward: per chunk, the mean and 1 / std of every statistic, in position order
// (cpg = 1) or group order (cpg > 1): `width` of each per chunk, (2, K * width) doubles.
struct ChunkPlan {
  const Geometry& g;
  int64_t D;          // features per sample
  int64_t tasks;      // chunks kk in [first(t), first(t + 1)) go to task t
  bool per_position;  // one cell per group: group statistics are per position
  bool identity;      // position p is cell p (contiguous input, or one cell per channel)
  bool blocks;        // identity with cpg > 1: group grp is positions grp * cpg .. (grp + 1) * cpg - 1
  int64_t width;      // saved statistics per chunk: U (per_position) or G
  // Per position: group, channel, offset of its group's first value in a sample, weight, bias;
  // pos_u: the position of cell u.
  std::vector<int64_t> pos_u, group_p, channel_p, first_p;
  std::vector<double> w_p, b_p;

  ChunkPlan(const Geometry& geometry, const std::vector<double>& w, const std::vector<double>& b)
      : g(geometry), D(g.C * g.S), per_position(g.cpg == 1), identity(!g.channels_last || g.k == 1) {
    blocks = identity && !per_position;
    tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.K));
    width = per_position ? g.U : g.G;
    pos_u.resize(g.U);
    group_p.resize(g.U);
    channel_p.resize(g.U);
    first_p.resize(g.U);
    w_p.resize(g.U);
    b_p.resize(g.U);
    for (int64_t u = 0; u < g.U; ++u) {
      const int64_t p = g.channels_last ? g.slot_u[u] : u, f = g.group_u[u] * g.L, c = g.channel_u[u];
      pos_u[u] = p;
      group_p[p] = g.group_u[u];
      channel_p[p] = c;
      first_p[p] = g.channels_last ? (f % g.S) * g.C + f / g.S : f;
      w_p[p] = w[c];
      b_p[p] = b.empty() ? 0.0 : b[c];
    }
  }
  // Whether chunk-at-a-time runs: more than one chunk, and whole chunks keep the tasks busy (at
  // least 80% of the time; otherwise the K-row tables with every pass split among the threads).
  static bool fits(const Geometry& g) {
    const int64_t threads = at::get_num_threads(), rounds = (g.K + threads - 1) / threads;
    return g.K > 1 && g.K * 5 >= 4 * threads * rounds;
  }
  int64_t first(int64_t t) const { return t * g.K / tasks; }
  int64_t samples(int64_t kk) const { return std::min(g.N, (kk + 1) * g.B) - kk * g.B; }

  // out[grp] = v[the position of group grp] (per_position only).
  void to_groups(const double* v, double* out) const {
    if (identity) return void(std::copy(v, v + g.G, out));
    for (int64_t grp = 0; grp < g.G; ++grp) out[grp] = v[pos_u[grp]];
  }
  // out[p] = v[the group of position p].
  void from_groups(const double* v, double* out) const {
    for (int64_t p = 0; p < g.U; ++p) out[p] = v[group_p[p]];
  }
  // out[grp] = the sum of v over the group's cells (in cell order).
  void group_sums(const double* v, double* out) const {
    for (int64_t grp = 0, u = 0; grp < g.G; ++grp) {
      double a = 0.0;
      for (const int64_t e = u + g.cpg; u < e; ++u) a += v[pos_u[u]];
      out[grp] = a;
    }
  }
  // sh[p] = the first value of p's group in the sample at x.
  template <typename scalar_t>
  void first_values(const scalar_t* x, at::opmath_type<scalar_t>* sh) const {
    using opmath_t = at::opmath_type<scalar_t>;
    if (g.channels_last && per_position) {  // position (s, c) starts at row s * R
      for (int64_t s = 0; s < g.k; ++s) {
        const scalar_t* row = x + s * g.R * g.C;
        opmath_t* out = sh + s * g.C;
        for (int64_t c = 0; c < g.C; ++c) out[c] = static_cast<opmath_t>(row[c]);
      }
      return;
    }
    for (int64_t p = 0; p < g.U; ++p) sh[p] = static_cast<opmath_t>(x[first_p[p]]);
  }

  // s1[p] = sum(f1), s2[p] = sum(f2) of (f1, f2) = op(x, y, sh[p]) over the `n` samples at x (and
  // y, which may be null): the sums of cell_sums, for one chunk. `part`: 2 * C of scratch.
  template <typename scalar_t, typename Op>
  void sums(const scalar_t* x, const scalar_t* y, int64_t n, const at::opmath_type<scalar_t>* sh, const Op& op,
            at::opmath_type<scalar_t>* part, double* s1, double* s2) const {
    std::fill(s1, s1 + g.U, 0.0);
    std::fill(s2, s2 + g.U, 0.0);
    if (!g.channels_last) {
      for (int64_t i = 0; i < n * g.U;) {
        for (int64_t u = 0; u < g.U; ++u, ++i) {
          const scalar_t* px = x + i * g.R;
          double f1, f2;
          run_sums(px, y ? y + i * g.R : px, g.R, sh[u], op, f1, f2);
          s1[u] += f1;
          s2[u] += f2;
        }
      }
      return;
    }
    if (g.C > kTile) {  // rows wider than a tile: row by row (tiles would read each row in pieces)
      for (int64_t r = 0; r < n * g.S;) {
        for (int64_t seg = 0; seg < g.k; ++seg, r += g.R) {
          segment_sums(x, y, r, r + g.R, g.C, sh + seg * g.C, op, part, part + g.C, s1 + seg * g.C,
                       s2 + seg * g.C);
        }
      }
      return;
    }
    for (int64_t r = 0; r < n * g.S;) {
      for (int64_t seg = 0; seg < g.k; ++seg, r += g.R) {
        const int64_t off = seg * g.C;
        if (g.C == kTile) {
          tile_sums<kTile>(x, y, r, r + g.R, g.C, g.C, sh + off, op, s1 + off, s2 + off);
        } else {
          tile_sums<0>(x, y, r, r + g.R, g.C, g.C, sh + off, op, s1 + off, s2 + off);
        }
      }
    }
  }
  // out = a[p] * x + b[p] (y null, c unused) or a[p] * y + c[p] * x + b[p] over `n` samples.
  template <typename scalar_t>
  void affine(const scalar_t* x, const scalar_t* y, scalar_t* out, int64_t n, const at::opmath_type<scalar_t>* a,
              const at::opmath_type<scalar_t>* c, const at::opmath_type<scalar_t>* b) const {
    using opmath_t = at::opmath_type<scalar_t>;
    if (!g.channels_last) {
      for (int64_t i = 0; i < n * g.U;) {
        for (int64_t u = 0; u < g.U; ++u, ++i) {
          affine_run(x + i * g.R, y ? y + i * g.R : nullptr, out + i * g.R, g.R, a[u], y ? c[u] : opmath_t(0), b[u]);
        }
      }
      return;
    }
    if (g.C > kTile) {
      for (int64_t r = 0; r < n * g.S;) {
        for (int64_t seg = 0, off = 0; seg < g.k; ++seg, off += g.C) {
          for (const int64_t e = r + g.R; r < e; ++r) {
            affine_row(x + r * g.C, y ? y + r * g.C : nullptr, out + r * g.C, g.C, a + off, y ? c + off : nullptr,
                       b + off);
          }
        }
      }
      return;
    }
    for (int64_t r = 0; r < n * g.S;) {
      for (int64_t seg = 0; seg < g.k; ++seg, r += g.R) {
        const int64_t off = seg * g.C;
        const opmath_t* pc = y ? c + off : nullptr;
        if (g.C == kTile) {
          tile_affine<kTile>(x, y, out, r, r + g.R, g.C, g.C, a + off, pc, b + off);
        } else {
          tile_affine<0>(x, y, out, r, r + g.R, g.C, g.C, a + off, pc, b + off);
        }
      }
    }
  }
};

// Training forward, chunk at a time: writes out, the saved statistics (see ChunkPlan) and the
// running statistics' targets (G each, group order: chunk 0's mean and unbiased variance, or with
// `average` their mean over chunks, as running_targets).
template <typename scalar_t>
void forward_chunks(const ChunkPlan& plan, const scalar_t* x, scalar_t* out, double eps, double* mean, double* rstd,
                    bool average, std::vector<double>& target_mean, std::vector<double>& target_var) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Geometry& g = plan.g;
  const int64_t U = g.U, G = g.G, W = plan.width;
  std::vector<double> targets(plan.tasks * 2 * W, 0.0);  // per task: sums of means, of unbiased variances
  at::parallel_for(0, plan.tasks, 1, [&](int64_t tb, int64_t te) {
    std::vector<double> s1(U), s2(U), gm(G), gv(G);
    std::vector<opmath_t> sh(U), ta(U), tb_(U), part(2 * g.C);
    const double* w = plan.w_p.data();
    const double* b = plan.b_p.data();
    for (int64_t t = tb; t < te; ++t) {
      double* tm = targets.data() + t * 2 * W;
      double* tv = tm + W;
      for (int64_t kk = plan.first(t); kk < plan.first(t + 1); ++kk) {
        const int64_t n = plan.samples(kk);
        const scalar_t* xc = x + kk * g.B * plan.D;
        opmath_t* ps = sh.data();
        if (plan.blocks) {  // the shifts: each group's first value, for its cpg positions
          for (int64_t p = 0; p < U; p += g.cpg) {
            const opmath_t first = static_cast<opmath_t>(xc[plan.first_p[p]]);
            for (int64_t j = 0; j < g.cpg; ++j) ps[p + j] = first;
          }
        } else {
          plan.first_values(xc, ps);  // the shifts
        }
        plan.sums(xc, static_cast<const scalar_t*>(nullptr), n, ps,
                  [](auto v, auto, auto s) {
                    const auto d = v - s;
                    return std::make_pair(d, d * d);
                  },
                  part.data(), s1.data(), s2.data());
        const double count = g.count(kk), inv = 1.0 / count;
        double* m = mean + kk * W;
        double* r = rstd + kk * W;
        double* v = plan.per_position ? s2.data() : gv.data();  // biased variances
        opmath_t* pa = ta.data();
        opmath_t* pb = tb_.data();
        if (plan.per_position) {
          const double* p1 = s1.data();
#pragma omp simd
          for (int64_t p = 0; p < U; ++p) {
            const double mm = p1[p] * inv, vp = std::max(v[p] * inv - mm * mm, 0.0);
            const double mp = static_cast<double>(ps[p]) + mm, rp = 1.0 / std::sqrt(vp + eps), a = rp * w[p];
            pa[p] = static_cast<opmath_t>(a);
            pb[p] = static_cast<opmath_t>(b[p] - mp * a);
            m[p] = mp;
            r[p] = rp;
            v[p] = vp;
          }
        } else if (plan.blocks) {  // one loop over groups, each over its cpg consecutive positions
          const double* q1 = s1.data();
          const double* q2 = s2.data();
          for (int64_t grp = 0, p = 0; grp < G; ++grp) {
            const int64_t p0 = p, e = p + g.cpg;
            double a1 = 0.0, a2 = 0.0;
            for (; p < e; ++p) {
              a1 += q1[p];
              a2 += q2[p];
            }
            const double mm = a1 * inv, vg = std::max(a2 * inv - mm * mm, 0.0);
            const double mg = static_cast<double>(ps[p0]) + mm, rg = 1.0 / std::sqrt(vg + eps);
            m[grp] = mg;
            r[grp] = rg;
            v[grp] = vg;
            for (p = p0; p < e; ++p) {
              const double a = rg * w[p];
              pa[p] = static_cast<opmath_t>(a);
              pb[p] = static_cast<opmath_t>(b[p] - mg * a);
            }
          }
        } else {
          double* p1 = gm.data();
          plan.group_sums(s1.data(), p1);
          plan.group_sums(s2.data(), v);
          for (int64_t grp = 0; grp < G; ++grp) m[grp] = static_cast<double>(ps[plan.pos_u[grp * g.cpg]]);
#pragma omp simd
          for (int64_t grp = 0; grp < G; ++grp) {
            const double mm = p1[grp] * inv;
            v[grp] = std::max(v[grp] * inv - mm * mm, 0.0);
            m[grp] += mm;
            r[grp] = 1.0 / std::sqrt(v[grp] + eps);
          }
          for (int64_t p = 0; p < U; ++p) {
            const int64_t grp = plan.group_p[p];
            const double a = r[grp] * w[p];
            pa[p] = static_cast<opmath_t>(a);
            pb[p] = static_cast<opmath_t>(b[p] - m[grp] * a);
          }
        }
        if (average || kk == 0) {
          const double unbias = count / (count - 1.0);
#pragma omp simd
          for (int64_t i = 0; i < W; ++i) {
            tm[i] += m[i];
            tv[i] += v[i] * unbias;
          }
        }
        plan.affine(xc, static_cast<const scalar_t*>(nullptr), out + kk * g.B * plan.D, n, pa,
                    static_cast<const opmath_t*>(nullptr), pb);
      }
    }
  });
  for (int64_t t = 1; t < plan.tasks; ++t) {
    for (int64_t i = 0; i < 2 * W; ++i) targets[i] += targets[t * 2 * W + i];
  }
  if (average) {
    for (int64_t i = 0; i < 2 * W; ++i) targets[i] /= static_cast<double>(g.K);
  }
  target_mean.resize(G);
  target_var.resize(G);
  if (plan.per_position) {
    plan.to_groups(targets.data(), target_mean.data());
    plan.to_groups(targets.data() + W, target_var.data());
  } else {
    std::copy(targets.begin(), targets.begin() + G, target_mean.begin());
    std::copy(targets.begin() + G, targets.begin() + 2 * G, target_var.begin());
  }
}

// Training backward, chunk at a time, from the forward's saved statistics: dx (when not null) and,
// in gsums, the weight's and the bias's gradients (C each).
template <typename scalar_t>
void backward_chunks(const ChunkPlan& plan, const scalar_t* x, const scalar_t* dy, scalar_t* dx, const double* mean,
                     const double* rstd, std::vector<double>& gsums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Geometry& g = plan.g;
  const int64_t U = g.U, G = g.G, C = g.C, W = plan.width;
  std::vector<double> acc(plan.tasks * 2 * U, 0.0);  // per task and position: weight's, bias's gradient
  at::parallel_for(0, plan.tasks, 1, [&](int64_t tb, int64_t te) {
    std::vector<double> mp(U), rp(U), s1(U), s2(U), cg(G), dg(G);
    std::vector<opmath_t> sh(U), ta(U), tc(U), td(U), part(2 * C);
    const double* w = plan.w_p.data();
    for (int64_t t = tb; t < te; ++t) {
      double* gw = acc.data() + t * 2 * U;
      double* gb = gw + U;
      for (int64_t kk = plan.first(t); kk < plan.first(t + 1); ++kk) {
        const int64_t n = plan.samples(kk), start = kk * g.B * plan.D;
        const double* m = mean + kk * W;
        const double* r = rstd + kk * W;
        // Per position: the mean, 1 / std, and the mean as opmath_t represents it (the shift).
        const double* pm = m;
        const double* pr = r;
        opmath_t* ps = sh.data();
        if (plan.blocks) {
          for (int64_t grp = 0, p = 0; grp < G; ++grp) {
            const opmath_t s = static_cast<opmath_t>(m[grp]);
            for (const int64_t e = p + g.cpg; p < e; ++p) ps[p] = s;
          }
          double* p1 = s1.data();
          double* p2 = s2.data();
          plan.sums(x + start, dy + start, n, ps,
                    [](auto v, auto d, auto s) { return std::make_pair(d, d * (v - s)); }, part.data(), p1, p2);
          // One loop over groups, each over its cpg consecutive positions: the parameters'
          // gradients, then the group sums of w * sum(dy) and w / std * sum(dy * (x - mean)) and the
          // dx tables, as below.
          const double inv = 1.0 / g.count(kk);
          opmath_t* pa = ta.data();
          opmath_t* pc = tc.data();
          opmath_t* pd = td.data();
          for (int64_t grp = 0, p = 0; grp < G; ++grp) {
            const int64_t p0 = p, e = p + g.cpg;
            const double mg = m[grp], rg = r[grp], sg = static_cast<double>(ps[p0]);
            double a1 = 0.0, a2 = 0.0;
            for (; p < e; ++p) {
              const double dyx = p2[p] + (sg - mg) * p1[p];
              gw[p] = mul_add(rg, dyx, gw[p]);
              gb[p] += p1[p];
              a1 += p1[p] * w[p];
              a2 += w[p] * rg * dyx;
            }
            if (!dx) continue;
            const double c = -rg * rg * a2 * inv;
            const opmath_t oc = static_cast<opmath_t>(c), od = static_cast<opmath_t>(-rg * a1 * inv - c * mg);
            for (p = p0; p < e; ++p) {
              pa[p] = static_cast<opmath_t>(rg * w[p]);
              pc[p] = oc;
              pd[p] = od;
            }
          }
          if (dx) plan.affine(x + start, dy + start, dx + start, n, pa, static_cast<const opmath_t*>(pc), pd);
          continue;
        }
        if (!plan.per_position) {
          plan.from_groups(m, mp.data());
          plan.from_groups(r, rp.data());
          pm = mp.data();
          pr = rp.data();
        }
#pragma omp simd
        for (int64_t p = 0; p < U; ++p) ps[p] = static_cast<opmath_t>(pm[p]);
        // Per position: sum(dy) and sum(dy * (x - mean)), shifted by the mean as opmath_t and
        // corrected for that rounding.
        double* p1 = s1.data();
        double* p2 = s2.data();
        plan.sums(x + start, dy + start, n, ps, [](auto v, auto d, auto s) { return std::make_pair(d, d * (v - s)); },
                  part.data(), p1, p2);
        // Then p1 = w * sum(dy), p2 = w / std * sum(dy * (x - mean)), per position.
#pragma omp simd
        for (int64_t p = 0; p < U; ++p) {
          const double dyx = p2[p] + (static_cast<double>(ps[p]) - pm[p]) * p1[p];
          gw[p] = mul_add(pr[p], dyx, gw[p]);
          gb[p] += p1[p];
          p1[p] *= w[p];
          p2[p] = w[p] * pr[p] * dyx;
        }
        if (!dx) continue;
        // dx = a * dy + c * x + d per position: c and d per group, a per position.
        const double inv = 1.0 / g.count(kk);
        opmath_t* pa = ta.data();
        opmath_t* pc = tc.data();
        opmath_t* pd = td.data();
        if (plan.per_position) {
#pragma omp simd
          for (int64_t p = 0; p < U; ++p) {
            const double c = -pr[p] * pr[p] * p2[p] * inv;
            pa[p] = static_cast<opmath_t>(pr[p] * w[p]);
            pc[p] = static_cast<opmath_t>(c);
            pd[p] = static_cast<opmath_t>(-pr[p] * p1[p] * inv - c * pm[p]);
          }
        } else {
          double* c1 = cg.data();
          double* d1 = dg.data();
          plan.group_sums(p1, c1);
          plan.group_sums(p2, d1);
#pragma omp simd
          for (int64_t grp = 0; grp < G; ++grp) {
            const double c = -r[grp] * r[grp] * d1[grp] * inv;
            d1[grp] = -r[grp] * c1[grp] * inv - c * m[grp];
            c1[grp] = c;
          }
          for (int64_t p = 0; p < U; ++p) {
            const int64_t grp = plan.group_p[p];
            pa[p] = static_cast<opmath_t>(pr[p] * w[p]);
            pc[p] = static_cast<opmath_t>(c1[grp]);
            pd[p] = static_cast<opmath_t>(d1[grp]);
          }
        }
        plan.affine(x + start, dy + start, dx + start, n, pa, static_cast<const opmath_t*>(pc), pd);
      }
    }
  });
  gsums.assign(2 * C, 0.0);
  for (int64_t t = 0; t < plan.tasks; ++t) {
    const double* gw = acc.data() + t * 2 * U;
    for (int64_t p = 0; p < U; ++p) {
      gsums[plan.channel_p[p]] += gw[p];
      gsums[C + plan.channel_p[p]] += gw[U + p];
    }
  }
}

struct Prepared {
  Tensor x;
  bool channels_last;
};

Prepared prepare(const Tensor& input) {
  if (input.is_contiguous()) return {input, false};
  if (is_channels_last(input)) return {input, true};
  return {input.contiguous(), false};
}

// Forward of training-mode BGN: the output, the statistics saved for the backward and the running
// statistics' targets (see running_targets). `per_chunk`: chunk at a time (ChunkPlan), which saves
// per-chunk means and 1 / std (see ChunkPlan); otherwise stats is (2, K * G) doubles, the
// per-(chunk, group) mean and biased variance (index kk * G + grp).
Tensor forward_train(const Tensor& input, const Tensor& weight, const Tensor& bias, int64_t groups, double eps,
                     int64_t chunk, bool average, Tensor& stats, bool& per_chunk, std::vector<double>& target_mean,
                     std::vector<double>& target_var) {
  Prepared p = prepare(input);
  Geometry g(p.x, groups, p.channels_last, chunk);
  Tensor out = at::empty_like(p.x, p.x.options(), format_of(p.x, p.channels_last));
  const auto w = channel_vector(weight, g.C, 1.0);
  const auto b = channel_vector(bias, g.C, 0.0);
  per_chunk = ChunkPlan::fits(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "bgn_forward", [&] {
    const scalar_t* px = p.x.const_data_ptr<scalar_t>();
    if (per_chunk) {
      const ChunkPlan plan(g, w, b);
      const int64_t size = g.K * plan.width;
      stats = torch::empty({2, size}, at::TensorOptions().dtype(at::kDouble));
      double* sp = stats.data_ptr<double>();
      forward_chunks<scalar_t>(plan, px, out.mutable_data_ptr<scalar_t>(), eps, sp, sp + size, average, target_mean,
                               target_var);
      return;
    }
    std::vector<double> mean, var;
    group_moments<scalar_t>(g, px, mean, var);
    running_targets(g, mean.data(), var.data(), average, target_mean, target_var);
    stats = torch::empty({2, g.K * g.G}, at::TensorOptions().dtype(at::kDouble));
    std::copy(mean.begin(), mean.end(), stats.data_ptr<double>());
    std::copy(var.begin(), var.end(), stats.data_ptr<double>() + g.K * g.G);
    const std::vector<double> rstd = inverse_std(var, eps);
    std::vector<double> alpha(g.K * g.U), beta(g.K * g.U), unused;
    for (int64_t kk = 0; kk < g.K; ++kk) {
      const double* r = rstd.data() + kk * g.G;
      const double* m = mean.data() + kk * g.G;
      double* a = alpha.data() + kk * g.U;
      double* be = beta.data() + kk * g.U;
      for (int64_t u = 0; u < g.U; ++u) {
        const int64_t grp = g.group_of(u), c = g.channel_of(u);
        a[u] = r[grp] * w[c];
        be[u] = b[c] - m[grp] * a[u];
      }
    }
    cell_affine<scalar_t>(g, px, nullptr, out.mutable_data_ptr<scalar_t>(), alpha, unused, beta);
  });
  return out;
}

// Differentiable composite of training-mode BGN (double backward goes through this graph).
Tensor composite(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t groups, double eps,
                 int64_t chunk) {
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = x.size(0), B = chunk_size(chunk, N);
  Tensor y;
  if (B == N) {
    Tensor xg = x.reshape({N, groups, -1}).to(dtype);
    auto [var, mean] = at::var_mean(xg, {0, 2}, /*correction=*/0, /*keepdim=*/true);
    y = ((xg - mean) * at::rsqrt(var + eps)).view(x.sizes());
  } else {
    // Full chunks as one (chunks, B, G, L) view; a shorter last chunk on its own.
    auto normalize = [&](const Tensor& part, int64_t chunks) {
      Tensor xg = part.reshape({chunks, part.size(0) / chunks, groups, -1}).to(dtype);
      auto [var, mean] = at::var_mean(xg, {1, 3}, /*correction=*/0, /*keepdim=*/true);
      return ((xg - mean) * at::rsqrt(var + eps)).reshape(part.sizes());
    };
    const int64_t full = N / B;
    y = normalize(x.narrow(0, 0, full * B), full);
    if (full * B < N) y = at::cat({y, normalize(x.narrow(0, full * B, N - full * B), 1)}, 0);
  }
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  if (weight.defined()) y = y * weight.view(shape);
  if (bias.defined()) y = y + bias.view(shape);
  return y.to(x.scalar_type());
}

class BatchGroupNormFunction : public torch::autograd::Function<BatchGroupNormFunction> {
 public:
  // weight and bias are autograd inputs, so "None" is a 0-element tensor (see `train`).
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight_in, const Tensor& bias_in,
                        int64_t groups, double eps, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_var, double factor, int64_t chunk,
                        bool running_average) {
    const Tensor weight = optional_param(weight_in), bias = optional_param(bias_in);
    Tensor stats;
    bool per_chunk = false;
    std::vector<double> target_mean, target_var;
    Tensor out = forward_train(x, weight, bias, groups, eps, chunk, running_average, stats, per_chunk, target_mean,
                               target_var);
    if (running_mean && running_var) update_running(*running_mean, *running_var, target_mean, target_var, factor);
    ctx->save_for_backward({x, weight_in, bias_in, stats});
    ctx->saved_data["per_chunk"] = per_chunk;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor weight = optional_param(saved[1]);
    const Tensor bias = optional_param(saved[2]);
    const Tensor& stats = saved[3];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = ctx->needs_input_grad(2);
    Tensor dy = grads[0];
    const variable_list none(10);  // one gradient (all undefined here) per forward argument
    if (!dy.defined()) return none;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate a differentiable graph
      std::vector<Tensor> inputs;
      if (need_x) inputs.push_back(x);
      if (need_w) inputs.push_back(saved[1]);
      if (need_b) inputs.push_back(saved[2]);
      Tensor y = composite(x, weight, bias, groups, eps, chunk);
      auto res = torch::autograd::grad({y}, inputs, {dy}, /*retain_graph=*/true, /*create_graph=*/true,
                                       /*allow_unused=*/true);
      size_t i = 0;
      Tensor dx = need_x ? res[i++] : Tensor();
      Tensor dw = need_w ? res[i++] : Tensor();
      Tensor db = need_b ? res[i++] : Tensor();
      variable_list out = none;
      out[0] = dx, out[1] = dw, out[2] = db;
      return out;
    }
    Prepared p = prepare(x);
    Geometry g(p.x, groups, p.channels_last, chunk);
    dy = dy.contiguous(format_of(p.x, p.channels_last));
    if (dy.scalar_type() != p.x.scalar_type()) dy = dy.to(p.x.scalar_type());
    const int64_t KG = g.K * groups;  // statistics per (chunk, group), index kk * G + grp
    const double* sp = stats.data_ptr<double>();
    const auto w = channel_vector(weight, g.C, 1.0);
    Tensor dx, dw, db;
    // The weight's and bias's gradients, (2, C) doubles.
    auto param_grads = [&](const std::vector<double>& gsums) {
      if (!(need_w || need_b)) return;
      Tensor sums = at::empty({2, g.C}, at::TensorOptions().dtype(at::kDouble));
      std::copy(gsums.begin(), gsums.end(), sums.data_ptr<double>());
      if (need_w) dw = sums[0].to(weight.scalar_type());
      if (need_b) db = sums[1].to(bias.scalar_type());
    };
    if (ctx->saved_data["per_chunk"].toBool()) {  // the forward's layout of stats, see ChunkPlan
      const int64_t size = stats.size(1);
      if (need_x) dx = at::empty_like(p.x, p.x.options(), format_of(p.x, p.channels_last));
      std::vector<double> gsums;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "bgn_backward", [&] {
        backward_chunks<scalar_t>(ChunkPlan(g, w, {}), p.x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                  need_x ? dx.mutable_data_ptr<scalar_t>() : nullptr, sp, sp + size, gsums);
      });
      param_grads(gsums);
      variable_list out = none;
      out[0] = dx, out[1] = dw, out[2] = db;
      return out;
    }
    const std::vector<double> mean(sp, sp + KG), rstd = inverse_std(std::vector<double>(sp + KG, sp + 2 * KG), eps);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "bgn_backward", [&] {
      const scalar_t* px = p.x.const_data_ptr<scalar_t>();
      const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
      // Per (chunk, cell): sum(dy) and sum(dy * (x - mean)), shifted by the chunk's mean as opmath_t
      // represents it (the channels-last loop works in opmath_t) and corrected for that rounding.
      using opmath_t = at::opmath_type<scalar_t>;
      // Tables indexed kk * U + u over (chunk, cell) and kk * G + grp over (chunk, group). The shift
      // is chunk 0's mean for every chunk; the correction below makes each chunk's sums exact.
      const int64_t KU = g.K * g.U;
      std::vector<double> shift(g.U);
      for (int64_t u = 0; u < g.U; ++u) shift[u] = static_cast<opmath_t>(mean[g.group_of(u)]);
      std::vector<double> sdy, sdyx;
      cell_sums<scalar_t>(g, px, pdy, shift.data(), sdy, sdyx, [](auto v, auto d, auto sh) {
        return std::make_pair(d, d * (v - sh));
      });
      std::vector<double> gsums(2 * g.C, 0.0), s1(KG, 0.0), s2(KG, 0.0);
      double* gw = gsums.data();
      double* gb = gw + g.C;
      // Sums kept in registers over a channel's (a group's) consecutive cells, no read-modify-write
      // chains through memory.
      for (int64_t kk = 0; kk < g.K; ++kk) {
        const double* m = mean.data() + kk * groups;
        const double* r = rstd.data() + kk * groups;
        const double* pdy_ = sdy.data() + kk * g.U;
        double* pdyx = sdyx.data() + kk * g.U;
        for (int64_t c = 0, u = 0; c < g.C; ++c) {
          double aw = 0.0, ab = 0.0;
          for (int64_t e = u + g.k; u < e; ++u) {
            const int64_t grp = g.group_of(u);
            pdyx[u] += (shift[u] - m[grp]) * pdy_[u];
            aw = mul_add(r[grp], pdyx[u], aw);
            ab += pdy_[u];
          }
          gw[c] += aw;
          gb[c] += ab;
        }
        if (!need_x) continue;
        double* p1 = s1.data() + kk * groups;
        double* p2 = s2.data() + kk * groups;
        for (int64_t grp = 0, u = 0; grp < groups; ++grp) {
          double a1 = 0.0, a2 = 0.0;
          const double rg = r[grp];
          for (int64_t e = u + g.cpg; u < e; ++u) {
            const double wc = w[g.channel_of(u)];
            a1 = mul_add(wc, pdy_[u], a1);
            a2 = mul_add(wc * rg, pdyx[u], a2);
          }
          p1[grp] = a1;
          p2[grp] = a2;
        }
      }
      param_grads(gsums);
      if (need_x) {
        // dx = a * dy + c * x + d per cell: c and d are per (chunk, group), a per (chunk, cell).
        std::vector<double> cg(KG), dg(KG), a(KU), c(KU), d(KU);
        for (int64_t kk = 0; kk < g.K; ++kk) {
          const double count = g.count(kk);
          for (int64_t grp = kk * groups; grp < (kk + 1) * groups; ++grp) {
            const double r = rstd[grp];
            cg[grp] = -r * r * s2[grp] / count;
            dg[grp] = -r * s1[grp] / count - cg[grp] * mean[grp];
          }
        }
        for (int64_t kk = 0, i = 0; kk < g.K; ++kk) {
          const double* r = rstd.data() + kk * groups;
          const double* pc = cg.data() + kk * groups;
          const double* pd = dg.data() + kk * groups;
          for (int64_t u = 0; u < g.U; ++u, ++i) {
            const int64_t grp = g.group_of(u);
            a[i] = r[grp] * w[g.channel_of(u)];
            c[i] = pc[grp];
            d[i] = pd[grp];
          }
        }
        dx = at::empty_like(p.x, p.x.options(), format_of(p.x, p.channels_last));
        cell_affine<scalar_t>(g, px, pdy, dx.mutable_data_ptr<scalar_t>(), a, c, d);
      }
    });
    variable_list out = none;
    out[0] = dx, out[1] = dw, out[2] = db;
    return out;
  }
};

void check_vector(const std::optional<Tensor>& t, int64_t size, const char* what) {
  TORCH_CHECK(!t || (t->dim() == 1 && t->numel() == size && t->device().is_cpu()), "batch_group_norm: ", what,
              " must be a 1-D tensor of ", size, " elements on the CPU, got shape ", t ? t->sizes() : at::IntArrayRef{});
}

// Training mode with batch statistics, per chunk of `chunk` samples (ghost batches; <= 0 or >= N:
// the whole batch); updates the running statistics when given, towards chunk 0's statistics or,
// with `running_average`, the mean over the chunks of theirs.
Tensor train(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
             int64_t groups, double eps, const std::optional<Tensor>& running_mean,
             const std::optional<Tensor>& running_var, double factor, int64_t chunk, bool running_average) {
  const int64_t values = Geometry::check(x, groups);
  TORCH_CHECK(values > 1, "batch_group_norm: expected more than 1 value per group in training, got input ",
              x.sizes());
  const int64_t N = x.size(0), B = chunk_size(chunk, N), last = N - (N - 1) / B * B;
  TORCH_CHECK(last * (values / N) > 1, "batch_group_norm: expected more than 1 value per group in every chunk of ",
              B, " samples, got ", last, " sample(s) of ", values / N, " value(s) per group in the last chunk of input ",
              x.sizes());
  check_vector(weight, x.size(1), "weight");
  check_vector(bias, x.size(1), "bias");
  check_vector(running_mean, groups, "running_mean");
  check_vector(running_var, groups, "running_var");
  const Tensor none = at::empty({0}, x.options());
  return BatchGroupNormFunction::apply(x, weight ? *weight : none, bias ? *bias : none, groups, eps, running_mean,
                                       running_var, factor, chunk, running_average);
}

// Eval mode with given per-group statistics; not differentiable (the caller checks).
Tensor eval(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
            int64_t groups, double eps, const Tensor& mean_t, const Tensor& var_t) {
  Geometry::check(input, groups);
  check_vector(weight, input.size(1), "weight");
  check_vector(bias, input.size(1), "bias");
  check_vector(mean_t, groups, "running_mean");
  check_vector(var_t, groups, "running_var");
  Prepared p = prepare(input);
  Geometry g(p.x, groups, p.channels_last);
  Tensor out = at::empty_like(p.x, p.x.options(), format_of(p.x, p.channels_last));
  const auto w = channel_vector(weight.value_or(Tensor()), g.C, 1.0);
  const auto b = channel_vector(bias.value_or(Tensor()), g.C, 0.0);
  const auto mean = channel_vector(mean_t, groups, 0.0);
  const auto var = channel_vector(var_t, groups, 1.0);
  std::vector<double> alpha(g.U), beta(g.U), unused;
  for (int64_t u = 0; u < g.U; ++u) {
    const int64_t grp = g.group_of(u), c = g.channel_of(u);
    alpha[u] = w[c] / std::sqrt(var[grp] + eps);
    beta[u] = b[c] - mean[grp] * alpha[u];
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "bgn_eval", [&] {
    cell_affine<scalar_t>(g, p.x.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(), alpha,
                          unused, beta);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batch Group Normalization CPU kernels (bgn_lightning)";
  m.def("train", &train,
        "Training-mode BGN (autograd-aware, updates running statistics), per chunk of `chunk` samples "
        "(ghost batches; <= 0 or >= N: the whole batch)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("groups"), py::arg("eps"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("factor"), py::arg("chunk") = 0, py::arg("running_average") = false);
  m.def("eval", &eval, "Eval-mode BGN with given statistics (no autograd)");
}
