// Fused PEER expert compute for CPUs (fp32): gather-dot-activate-scale-accumulate in one pass over
// each pair's table rows, so a pair costs two row reads in forward, two in backward and two
// read-modify-writes of gradient rows, instead of the gathered [P, h] copies of the torch paths.
//
// Layout: token-major CSR pairs (offsets[T+1], ids[P], gates[P]); x, out, dy, dx [T, h]; tables
// u, v and their gradient buffers [N, h]; all row-major, contiguous. Work is split over
// std::threads (not OpenMP: torch ships its own OpenMP runtime and two in one process clash):
// tokens by contiguous ranges for the token-side passes; for the table gradients, pairs sorted by
// expert id and cut into per-thread ranges at id changes (each row has one owner: no atomics, and
// the result is deterministic).
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  // 16 independent partial sums: vectorisable without -ffast-math.
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Rows are picked at random from tables far larger than the caches, so the hardware prefetcher
// cannot guess them: request the row of a pair a few pairs ahead while the current one computes.
constexpr int64_t kAhead = 4;

inline void prefetch_row(const float* row, int64_t n, int write) {
  for (int64_t i = 0; i < n; i += 16) {
    if (write) __builtin_prefetch(row + i, 1, 1);
    else __builtin_prefetch(row + i, 0, 1);
  }
}

// act: 0 gelu (exact erf), 1 relu, 2 silu.
inline float act_f(int act, float s) {
  if (act == 1) return s > 0.f ? s : 0.f;
  if (act == 2) return s / (1.f + std::exp(-s));
  return 0.5f * s * (1.f + std::erf(s * 0.70710678118654752f));
}

inline float act_grad(int act, float s) {
  if (act == 1) return s > 0.f ? 1.f : 0.f;
  if (act == 2) {
    float sig = 1.f / (1.f + std::exp(-s));
    return sig * (1.f + s * (1.f - sig));
  }
  float cdf = 0.5f * (1.f + std::erf(s * 0.70710678118654752f));
  float pdf = std::exp(-0.5f * s * s) * 0.39894228040143268f;
  return cdf + s * pdf;
}

template <typename F>
void parallel_ranges(int64_t n, int threads, F fn) {
  if (threads <= 1 || n < 2) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  int64_t step = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    int64_t lo = t * step, hi = lo + step < n ? lo + step : n;
    if (lo >= hi) break;
    pool.emplace_back(fn, lo, hi);
  }
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// out[t] = sum_p g_p act(u[e_p] . x[t]) v[e_p]; s[p] = u[e_p] . x[t] (kept for backward).
void peer_forward(const float* x, const float* u, const float* v, const int64_t* ids, const float* gates,
                  const int64_t* offsets, int64_t T, int64_t h, int act, float* s, float* out, int threads) {
  parallel_ranges(T, threads, [=](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xt = x + t * h;
      float* ot = out + t * h;
      for (int64_t p = offsets[t]; p < offsets[t + 1]; ++p) {
        const int64_t e = ids[p];
        if (p + kAhead < offsets[t1]) {
          prefetch_row(u + ids[p + kAhead] * h, h, 0);
          prefetch_row(v + ids[p + kAhead] * h, h, 0);
        }
        const float sp = dot(u + e * h, xt, h);
        s[p] = sp;
        axpy(gates[p] * act_f(act, sp), v + e * h, ot, h);
      }
    }
  });
}

// Token side of backward: dz = v[e] . dy[t]; dg = dz act(s); ds = dz g act'(s); dx[t] += ds u[e].
// Writes the per-pair coefficients of the table gradients: cu = ds, cv = g act(s).
void peer_backward_tokens(const float* u, const float* v, const int64_t* ids, const float* gates,
                          const int64_t* offsets, const float* s, const float* dy, int64_t T, int64_t h, int act,
                          float* dx, float* dg, float* cu, float* cv, int threads) {
  parallel_ranges(T, threads, [=](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* dyt = dy + t * h;
      for (int64_t p = offsets[t]; p < offsets[t + 1]; ++p) {
        const int64_t e = ids[p];
        if (p + kAhead < offsets[t1]) {
          prefetch_row(v + ids[p + kAhead] * h, h, 0);
          if (dx) prefetch_row(u + ids[p + kAhead] * h, h, 0);
        }
        const float dz = dot(v + e * h, dyt, h);
        const float a = act_f(act, s[p]);
        const float ds = dz * gates[p] * act_grad(act, s[p]);
        if (dg) dg[p] = dz * a;
        if (dx) axpy(ds, u + e * h, dx + t * h, h);
        cu[p] = ds;
        cv[p] = gates[p] * a;
      }
    }
  });
}

// Table side: gu[e] += cu_p x[t_p], gv[e] += cv_p dy[t_p], over pairs sorted by expert id (the
// caller sorts), so rows are visited in ascending order; bounds[k] .. bounds[k+1] is the pair
// range of thread k, cut at changes of expert id: every row is owned by one thread (no atomics,
// deterministic order).
void peer_backward_tables(const float* x, const float* dy, const int64_t* ids, const int64_t* tok,
                          const float* cu, const float* cv, const int64_t* bounds, int64_t h, float* gu, float* gv,
                          int threads) {
  parallel_ranges(threads, threads, [=](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t end = bounds[k + 1];
      for (int64_t p = bounds[k]; p < end; ++p) {
        const int64_t e = ids[p];
        if (p + kAhead < end) {
          if (gu) prefetch_row(gu + ids[p + kAhead] * h, h, 1);
          if (gv) prefetch_row(gv + ids[p + kAhead] * h, h, 1);
        }
        const int64_t t = tok[p];
        if (gu) axpy(cu[p], x + t * h, gu + e * h, h);
        if (gv) axpy(cv[p], dy + t * h, gv + e * h, h);
      }
    }
  });
}

// Top-k of each row of scores [rows, n], sorted descending (ties: lower index first): a running
// sorted list of k, entered only by values above its current minimum, so a row costs ~n compares
// (the product-key sub-key search keeps k' ~ 16 of n ~ 1024).
void row_topk(const float* scores, int64_t rows, int64_t n, int64_t k, float* vals, int64_t* idx, int threads) {
  parallel_ranges(rows, threads, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = scores + r * n;
      float* bv = vals + r * k;
      int64_t* bi = idx + r * k;
      int64_t filled = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float x = row[j];
        if (filled == k && !(x > bv[k - 1])) continue;  // also skips NaN
        int64_t pos = filled < k ? filled++ : k - 1;
        while (pos > 0 && bv[pos - 1] < x) {
          bv[pos] = bv[pos - 1];
          bi[pos] = bi[pos - 1];
          --pos;
        }
        bv[pos] = x;
        bi[pos] = j;
      }
      for (int64_t j = filled; j < k; ++j) {  // rows of NaN: fill like torch would (any order)
        bv[j] = row[j];
        bi[j] = j;
      }
    }
  });
}

}  // extern "C"
