// Fused multi-head attention for XLA's CPU backend, as two XLA FFI handlers (forward, backward).
//
// Why (benchmarks/README.md has the measurements): XLA:CPU runs attention's small batched dots
// ([128 x 32] x [32 x 128] per head) far below its rate for the model's plain dots, and writes
// every [batch, heads, q, k] intermediate to memory. Here each (batch, head) pair is one task:
// its scores, softmax, dropout and mixing stay in a thread's cache, in register-blocked loops
// the compiler vectorises (GCC/Clang vector extensions, so the same source builds for AVX-512,
// AVX2 or NEON with -march=native).
//
// Layout: q, k, v, out and their gradients are [batch, length, heads, depth] (the layout of
// Hugging Face's _split_heads), float32, depth a multiple of 16. bias is [batch or 0, length]
// (added to every query's scores: padding), mult is [heads or 1 or 0, length, length] (the
// dropout keep mask / keep probability, times a head mask) and segments is [batch or 0, length]
// (segment ids); 0 rows: none. Segments are for sequence packing, which puts several examples
// in one row: query i sees key j only where segments[b, j] == segments[b, i] (block-diagonal
// attention; every query sees itself, and padding, segment 0, sees only padding). The forward
// also returns each query row's softmax statistics [batch, heads, length, 2] (the largest score
// and 1 / the sum of exponentials); the backward recomputes the probabilities from them instead
// of keeping them, as FlashAttention does. (Not one log-sum-exp: in a row whose keys are all
// masked, max + log(sum) rounds back to max, and the row would come back as ones.)
//
// Values: out = (softmax(q k^T / sqrt(depth) + bias + segment mask) * mult) v, the segment mask
// -inf where the key's segment is not the query's, as jaxft/attention.py's JAX path computes
// (jaxft/cpu/attention.py calls these handlers).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < W; ++i) s += v[i]; return s; }
inline float hmax(vf v) { float s = v[0]; for (int i = 1; i < W; ++i) s = std::max(s, v[i]); return s; }

// exp of 16 lanes: 2^n * e^r with |r| <= ln2/2, Cephes' degree-6 polynomial (relative error
// ~2e-7, as libm's expf). n is rounded by adding 1.5 * 2^23, which leaves it in the low bits of
// the sum, so no float-int conversions are needed. Inputs below -87.3 give exp(-87.3) ~ 1e-38
// instead of 0 (masked keys: a weight of 1e-38 changes no float32 result).
inline vf vexp(vf x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;
  const vf t = x * 1.44269504088896341f + kRound;
  const vf n = t - kRound;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  vi bits;
  std::memcpy(&bits, &t, sizeof bits);
  constexpr int32_t kRoundBits = 0x4B400000;  // the bits of kRound
  bits = (bits - kRoundBits + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// C[R rows, NV vectors] = alpha * scale[r * ss] * sum_k A(r, k) B[k, :]: A(r, k) =
// A[r * lda + k] (row-major) or, with TA, A[k * lda + r]; B rows at stride ldb; scale may be
// null (ones).
// The R x NV accumulators stay in registers.
template <int R, int NV, bool TA>
inline void micro(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, float* C,
                  int64_t ldc, float alpha, const float* scale, int64_t ss) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int c = 0; c < NV; ++c) b[c] = load(B + k * ldb + c * W);
    for (int r = 0; r < R; ++r) {
      const vf a = splat(TA ? A[k * lda + r] : A[r * lda + k]);
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    const float f = scale ? alpha * scale[r * ss] : alpha;
    for (int c = 0; c < NV; ++c) store(C + r * ldc + c * W, acc[r][c] * f);
  }
}

// Rows [0, M) of one NV-vector column panel, in blocks of R, then smaller blocks for the rest.
template <int NV, bool TA, int R>
inline void panel(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M,
                  int64_t K, float* C, int64_t ldc, float alpha, const float* scale,
                  int64_t ss) {
  int64_t m = 0;
  for (; m + R <= M; m += R)
    micro<R, NV, TA>(TA ? A + m : A + m * lda, lda, B, ldb, K, C + m * ldc, ldc, alpha,
                     scale ? scale + m * ss : nullptr, ss);
  if constexpr (R > 1) {
    panel<NV, TA, (R > 3 ? R / 2 : 1)>(TA ? A + m : A + m * lda, lda, B, ldb, M - m, K,
                                       C + m * ldc, ldc, alpha, scale ? scale + m * ss : nullptr,
                                       ss);
  }
}

// C[M x N] = alpha * diag(scale) A[M x K] B[K x N] (A transposed in memory with TA; scale,
// at stride ss, may be null); N a multiple of W.
template <bool TA>
void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M, int64_t N,
          int64_t K, float* C, int64_t ldc, float alpha, const float* scale = nullptr,
          int64_t ss = 1) {
  int64_t n = 0;
  for (; n + 4 * W <= N; n += 4 * W)
    panel<4, TA, 6>(A, lda, B + n, ldb, M, K, C + n, ldc, alpha, scale, ss);
  for (; n + 2 * W <= N; n += 2 * W)
    panel<2, TA, 12>(A, lda, B + n, ldb, M, K, C + n, ldc, alpha, scale, ss);
  for (; n + W <= N; n += W)
    panel<1, TA, 12>(A, lda, B + n, ldb, M, K, C + n, ldc, alpha, scale, ss);
}

struct Shape {
  int64_t batch, length, heads, depth;
  int64_t padded;  // length rounded up to W: the row stride of [length, padded] score tiles
  int64_t row() const { return heads * depth; }  // stride between positions in q, k, v
  int64_t offset(int64_t b, int64_t h) const { return b * length * row() + h * depth; }
  int64_t tile() const { return length * padded; }
};

// What one call computes on: the operands (see the file comment) and their shape.
struct Problem {
  Shape shape;
  const float *q, *k, *v, *bias, *mult, *segments;  // bias, mult, segments: null when absent
  int64_t mult_heads;
  const float* mult_tile(int64_t h) const {
    return mult ? mult + (mult_heads > 1 ? h : 0) * shape.length * shape.length : nullptr;
  }
};

// A task: batch row b, heads [h0, h1). Its operands are read row by row, in memory order, into
// per-thread buffers that stay in the core's cache while its heads are computed.
struct Task {
  int64_t b, h0, h1;
  int64_t heads() const { return h1 - h0; }
};

// Heads per task: as many as keep the two packed [depth, padded] operands of each within 256 KB
// (a quarter of a small L2), and few enough that every thread gets several tasks.
inline int64_t heads_per_task(const Shape& s, int64_t threads) {
  const int64_t per_head = 2 * s.padded * s.depth * static_cast<int64_t>(sizeof(float));
  int64_t heads = std::clamp<int64_t>((256 << 10) / per_head, 1, s.heads);
  while (heads > 1 && s.batch * ((s.heads + heads - 1) / heads) < 4 * threads) heads /= 2;
  return heads;
}

inline int64_t task_count(const Shape& s, int64_t per_task) {
  return s.batch * ((s.heads + per_task - 1) / per_task);
}

inline Task task_at(const Shape& s, int64_t per_task, int64_t index) {
  const int64_t groups = (s.heads + per_task - 1) / per_task;
  const int64_t b = index / groups, h0 = (index % groups) * per_task;
  return {b, h0, std::min(s.heads, h0 + per_task)};
}

// xt[h - t.h0][d][j] = x[t.b, j, h, d] for the task's heads, zero for j in [length, padded).
void pack_transposed(const float* x, const Shape& s, const Task& t, float* xt) {
  const int64_t block = s.depth * s.padded;
  for (int64_t j = 0; j < s.padded; ++j) {
    const float* row = x + s.offset(t.b, t.h0) + j * s.row();
    for (int64_t h = 0; h < t.heads(); ++h)
      for (int64_t d = 0; d < s.depth; ++d)
        xt[h * block + d * s.padded + j] = j < s.length ? row[h * s.depth + d] : 0.f;
  }
}

// The padding bias of batch row b over [0, padded): -inf past length, so padded columns drop
// out of every softmax without a branch.
void bias_row(const Problem& pr, int64_t b, float* out) {
  const Shape& s = pr.shape;
  for (int64_t j = 0; j < s.padded; ++j)
    out[j] = j >= s.length ? -INFINITY : pr.bias ? pr.bias[b * s.length + j] : 0.f;
}

// The segment ids of batch row b over [0, padded) (0 past length, where bias_row's -inf
// already masks the keys), or null without segments.
const float* segment_row(const Problem& pr, int64_t b, float* out) {
  const Shape& s = pr.shape;
  if (!pr.segments) return nullptr;
  for (int64_t j = 0; j < s.padded; ++j)
    out[j] = j < s.length ? pr.segments[b * s.length + j] : 0.f;
  return out;
}

// The bias of query i's scores: the key bias `bias` where key j is in query i's segment, -inf
// elsewhere, written to `out`; without segments, `bias` itself (shared by all queries).
inline const float* query_bias(const float* bias, const float* segments, int64_t i,
                               int64_t padded, float* out) {
  if (!segments) return bias;
  const vf own = splat(segments[i]);
  for (int64_t j = 0; j < padded; j += W)
    store(out + j, load(segments + j) == own ? load(bias + j) : splat(-INFINITY));
  return out;
}

// W floats from p[j], lanes at or beyond `length` zero (the tail of an unpadded row).
inline vf load_row(const float* p, int64_t j, int64_t length) {
  if (j + W <= length) return load(p + j);
  vf x = vf{};
  for (int64_t u = 0; j + u < length; ++u) x[u] = p[j + u];
  return x;
}

// out = q[b, :, h, :] kt / sqrt(depth): [length, padded] scores from kt [depth, padded].
void scores(const float* q, const float* kt, const Shape& s, int64_t b, int64_t h, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(s.depth));
  gemm<false>(q + s.offset(b, h), s.row(), kt, s.padded, s.length, s.padded, s.depth, out,
              s.padded, scale);
}

// The forward's softmax of one row of scores plus bias, fused with dropout: row <- exp(x - max)
// * mult, not yet divided by the sum (the mixing dot's epilogue does that, on depth values
// instead of length); sets stats[0] = max and stats[1] = 1 / sum (for the backward).
inline void softmax_row(float* row, const float* bias, const float* mult, int64_t length,
                        int64_t padded, float* stats) {
  vf m = splat(-INFINITY);
  for (int64_t j = 0; j < padded; j += W) {
    const vf x = load(row + j) + load(bias + j);
    m = x > m ? x : m;
  }
  const float max = hmax(m);
  vf sum = vf{};
  for (int64_t j = 0; j < padded; j += W) {
    const vf e = vexp(load(row + j) + load(bias + j) - max);
    sum += e;
    store(row + j, mult ? e * load_row(mult, j, length) : e);
  }
  const float total = hsum(sum);
  stats[0] = max;
  stats[1] = 1.f / total;
}

// Per-thread buffers, grown as needed and kept for the thread's next call.
float* scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

void forward_task(const Problem& pr, const Task& t, float* out, float* stats) {
  const Shape& s = pr.shape;
  const int64_t block = s.depth * s.padded;
  float* kt = scratch(t.heads() * block + s.tile() + 3 * s.padded);
  float* p = kt + t.heads() * block;  // scores, then exp(scores - max) * mult
  float* bias = p + s.tile();
  float* own_bias = bias + s.padded;  // one query's bias, with segments
  pack_transposed(pr.k, s, t, kt);
  bias_row(pr, t.b, bias);
  const float* segments = segment_row(pr, t.b, own_bias + s.padded);
  for (int64_t h = t.h0; h < t.h1; ++h) {
    scores(pr.q, kt + (h - t.h0) * block, s, t.b, h, p);
    const float* mult = pr.mult_tile(h);
    float* row_stats = stats + (t.b * s.heads + h) * s.length * 2;
    for (int64_t i = 0; i < s.length; ++i)
      softmax_row(p + i * s.padded, query_bias(bias, segments, i, s.padded, own_bias),
                  mult ? mult + i * s.length : nullptr, s.length, s.padded, row_stats + 2 * i);
    // out = diag(1 / sums) p v: the division applied to depth outputs per row, not length.
    gemm<false>(p, s.padded, pr.v + s.offset(t.b, h), s.row(), s.length, s.depth, s.length,
                out + s.offset(t.b, h), s.row(), 1.f, row_stats + 1, 2);
  }
}

void backward_task(const Problem& pr, const Task& t, const float* stats, const float* g,
                   float* dq, float* dk, float* dv) {
  const Shape& s = pr.shape;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.depth));
  const int64_t block = s.depth * s.padded;
  float* kt = scratch(2 * t.heads() * block + 3 * s.tile() + 3 * s.padded);
  float* vt = kt + t.heads() * block;
  float* p = vt + t.heads() * block;  // probabilities
  float* kept = p + s.tile();         // after dropout
  float* ds = kept + s.tile();        // gradient of the scores
  float* bias = ds + s.tile();
  float* own_bias = bias + s.padded;  // one query's bias, with segments
  pack_transposed(pr.k, s, t, kt);
  pack_transposed(pr.v, s, t, vt);
  bias_row(pr, t.b, bias);
  const float* segments = segment_row(pr, t.b, own_bias + s.padded);
  for (int64_t h = t.h0; h < t.h1; ++h) {
    const int64_t at = s.offset(t.b, h);
    scores(pr.q, kt + (h - t.h0) * block, s, t.b, h, p);
    const float* mult = pr.mult_tile(h);
    const float* row_stats = stats + (t.b * s.heads + h) * s.length * 2;
    float* dropped = mult ? kept : p;
    for (int64_t i = 0; i < s.length; ++i) {  // the forward's probabilities, from its stats
      float* row = p + i * s.padded;
      const float* row_bias = query_bias(bias, segments, i, s.padded, own_bias);
      const vf max = splat(row_stats[2 * i]), inverse = splat(row_stats[2 * i + 1]);
      for (int64_t j = 0; j < s.padded; j += W) {
        const vf e = vexp(load(row + j) + load(row_bias + j) - max) * inverse;
        store(row + j, e);
        if (mult) store(kept + i * s.padded + j, e * load_row(mult + i * s.length, j, s.length));
      }
    }
    // d(kept) = g v^T; then the softmax backward dS = P * (dP - rowsum(P * dP)), where
    // P * dP = kept * d(kept), so the dropout mask is not needed again.
    gemm<false>(g + at, s.row(), vt + (h - t.h0) * block, s.padded, s.length, s.padded,
                s.depth, ds, s.padded, 1.f);
    for (int64_t i = 0; i < s.length; ++i) {
      float* d = ds + i * s.padded;
      const float* kr = dropped + i * s.padded;
      const float* pr_row = p + i * s.padded;
      vf rowsum = vf{};
      for (int64_t j = 0; j < s.padded; j += W) {
        const vf x = load(d + j) * load(kr + j);
        store(d + j, x);
        rowsum += x;
      }
      const vf r = splat(hsum(rowsum));
      for (int64_t j = 0; j < s.padded; j += W) store(d + j, load(d + j) - load(pr_row + j) * r);
    }
    gemm<false>(ds, s.padded, pr.k + at, s.row(), s.length, s.depth, s.length, dq + at,
                s.row(), scale);  // dq = dS k / sqrt(depth)
    gemm<true>(ds, s.padded, pr.q + at, s.row(), s.length, s.depth, s.length, dk + at,
               s.row(), scale);   // dk = dS^T q / sqrt(depth)
    gemm<true>(dropped, s.padded, g + at, s.row(), s.length, s.depth, s.length, dv + at,
               s.row(), 1.f);     // dv = kept^T g
  }
}

// Starts body(i) for i in [0, n) on the XLA intra-op pool, one worker per thread taking indices
// from a shared counter, and returns at once: the future is ready when every worker is done.
// Meanwhile XLA's thunk executor runs whatever else in the program is ready, as with its own
// asynchronous dots. (A kernel that kept its calling thread waiting made the whole MiniLM
// train step slower than the JAX attention, although the kernel itself took half the time.)
template <typename Body>
ffi::Future launch(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct State {
    State(int64_t n, Body body) : n(n), body(std::move(body)) {}
    std::atomic<int64_t> next{0};
    const int64_t n;
    const Body body;
  };
  if (n == 0) {  // an empty batch
    ffi::Promise ready;
    ffi::Future future(ready);
    ready.SetAvailable();
    return future;
  }
  auto state = std::make_shared<State>(n, std::move(body));
  const int64_t workers = std::clamp<int64_t>(pool.num_threads(), 1, n);
  ffi::CountDownPromise done(workers);
  ffi::Future future(done);
  for (int64_t w = 0; w < workers; ++w) {
    pool.Schedule([state, done]() mutable {
      for (int64_t i; (i = state->next.fetch_add(1)) < state->n;) state->body(i);
      done.CountDown();
    });
  }
  return future;
}

ffi::Future failed(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

// The operands of one call, checked against the layouts in the file comment.
ffi::ErrorOr<Problem> problem(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                              ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::F32>& bias,
                              ffi::Buffer<ffi::F32>& mult, ffi::Buffer<ffi::F32>& segments) {
  const auto d = q.dimensions();
  const auto same = [&](ffi::Span<const int64_t> x) {
    return x.size() == 4 && std::equal(x.begin(), x.end(), d.begin());
  };
  if (d.size() != 4 || d[3] % W != 0 || !same(k.dimensions()) || !same(v.dimensions()))
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jaxft attention: q, k, v must be [batch, length, heads, depth] alike, with depth a "
        "multiple of 16"));
  Problem pr;
  pr.shape = {d[0], d[1], d[2], d[3], (d[1] + W - 1) / W * W};
  const Shape& s = pr.shape;
  const auto bd = bias.dimensions(), md = mult.dimensions(), sd = segments.dimensions();
  if (bd.size() != 2 || (bd[0] != 0 && bd[0] != s.batch) || bd[1] != s.length)
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("jaxft attention: bias must be [batch or 0, length]"));
  if (md.size() != 3 || (md[0] > 1 && md[0] != s.heads) || md[1] != s.length ||
      md[2] != s.length)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jaxft attention: mult must be [heads or 1 or 0, length, length]"));
  if (sd.size() != 2 || (sd[0] != 0 && sd[0] != s.batch) || sd[1] != s.length)
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("jaxft attention: segments must be [batch or 0, length]"));
  pr.q = q.typed_data();
  pr.k = k.typed_data();
  pr.v = v.typed_data();
  pr.bias = bd[0] ? bias.typed_data() : nullptr;
  pr.mult_heads = md[0];
  pr.mult = md[0] ? mult.typed_data() : nullptr;
  pr.segments = sd[0] ? segments.typed_data() : nullptr;
  return pr;
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> segments,
                    ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> stats) {
  auto pr = problem(q, k, v, bias, mult, segments);
  if (pr.has_error()) return failed(pr.error());
  const int64_t per_task = heads_per_task(pr->shape, std::max<int64_t>(1, pool.num_threads()));
  return launch(pool, task_count(pr->shape, per_task),
                [pr = *pr, per_task, o = out->typed_data(), st = stats->typed_data()](int64_t i) {
                  forward_task(pr, task_at(pr.shape, per_task, i), o, st);
                });
}

ffi::Future Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                     ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> segments,
                     ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> g,
                     ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                     ffi::ResultBuffer<ffi::F32> dv) {
  auto pr = problem(q, k, v, bias, mult, segments);
  if (pr.has_error()) return failed(pr.error());
  const int64_t per_task = heads_per_task(pr->shape, std::max<int64_t>(1, pool.num_threads()));
  return launch(pool, task_count(pr->shape, per_task),
                [pr = *pr, per_task, st = stats.typed_data(), go = g.typed_data(),
                 dq = dq->typed_data(), dk = dk->typed_data(), dv = dv->typed_data()](int64_t i) {
                  backward_task(pr, task_at(pr.shape, per_task, i), st, go, dq, dk, dv);
                });
}

}  // namespace

// The two entry points jaxft/cpu/attention.py registers; everything else stays hidden
// (-fvisibility).
#define JAXFT_EXPORT extern "C" __attribute__((visibility("default")))
JAXFT_EXPORT XLA_FFI_Error* JaxftAttentionForward(XLA_FFI_CallFrame* call_frame);
JAXFT_EXPORT XLA_FFI_Error* JaxftAttentionBackward(XLA_FFI_CallFrame* call_frame);

namespace {
using F32 = ffi::Buffer<ffi::F32>;

// What both handlers take first: the intra-op thread pool, then q, k, v, bias, mult, segments.
auto bind_operands() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
      .Arg<F32>().Arg<F32>();
}
}  // namespace

// Forward: operands -> out, stats.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxftAttentionForward, Forward,
                              bind_operands().Ret<F32>().Ret<F32>());

// Backward: operands, stats, g (the output's gradient) -> dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxftAttentionBackward, Backward,
                              bind_operands().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>()
                                  .Ret<F32>());
