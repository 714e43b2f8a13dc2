// graphprune::prox24 -- the exact 2:4 proximal operator, per group.
//
// For every group z of four values and weight lam >= 0 the operator is
//   prox(z) = argmin_u 0.5 |u - z|^2 + lam * sum_{i<j<k} |u_i u_j u_k|
// (graphprune/solvers/proximal.py derives it and holds the reference implementation in
// Python; this file follows it case by case). With y = |z| sorted decreasingly:
//   * lam == 0: u = y;
//   * the 2-sparse point (y1, y2, 0, 0) is the answer unless y3 > lam (y1 - r)+ (y2 - r)+
//     with r = |(y3, y4)| (the screen: no point with a third non-zero can beat it);
//   * if 2 lam (y1 + y2 + y3) < 1 the objective is strictly convex on the box [0, y]
//     and exact coordinate descent converges to its minimiser, taken when it beats the
//     2-sparse point;
//   * otherwise the best of the stationary points: with three non-zeros, the roots of a
//     monic quintic in x = lam c on (0, min(lam y3, y2 / y1, 1)], counted by the
//     Budan-Fourier bound, isolated by bisection and refined by Newton steps kept inside
//     their bracket; with four non-zeros (only when y4 passes the same screen), the sign
//     changes of the reduced equation R(p) on a 72-point grid, refined by the Illinois
//     method.
// Convex groups whose descent has not met its tolerance after kMaxSweeps sweeps (rare)
// are flagged in `pending`; the Python operator computes them with projected Newton
// steps. The answer carries the signs of z and its order (a stable sort: of equal
// magnitudes the earlier input ranks first; a zero answer may be -0.0). z may be float32
// or float64 (the output has its dtype); the arithmetic is float64 throughout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kMaxSweeps = 256;
constexpr int kRootIters = 80;   // bracketed refinement cap (as the Python operator's)
constexpr int kBrackets = 4;     // stationary points with four non-zeros tried per group
constexpr int kMaxDepth = 60;    // bisection depth when isolating the quintic's roots
constexpr int kGrid = 72;
constexpr double kEps = DBL_EPSILON;
constexpr double kTiny = DBL_MIN;

// p = u1 + u2 in units of its upper end: 48 uniform points, then 24 geometric ones towards 1.
struct Grid {
  double at[kGrid];
  Grid() {
    for (int i = 0; i < 48; ++i) at[i] = static_cast<double>(i) / 48.0;
    for (int i = 0; i < 24; ++i) at[48 + i] = 1.0 - std::pow(10.0, -1.5 + (-12.0 + 1.5) * i / 23.0);
    std::sort(at, at + kGrid);
  }
};
const Grid kP;

inline double objective(const double* u, const double* y, double lam) {
  double q = 0.0;
  for (int i = 0; i < 4; ++i) q += (u[i] - y[i]) * (u[i] - y[i]);
  return 0.5 * q + lam * (std::abs(u[0] * u[1]) * (std::abs(u[2]) + std::abs(u[3])) +
                          std::abs(u[2] * u[3]) * (std::abs(u[0]) + std::abs(u[1])));
}

inline double sgn(double v) { return v > 0 ? 1.0 : (v < 0 ? -1.0 : 0.0); }

// ---------------------------------------------------------------- three non-zeros

struct Quintic {
  double c[5];  // c0..c4; the x^5 coefficient is 1

  void eval(double x, double& p, double& dp) const {
    p = 1.0;
    dp = 0.0;
    for (int i = 4; i >= 0; --i) {
      dp = dp * x + p;
      p = p * x + c[i];
    }
  }

  // Sign variations of (P(x), P'(x), ..., P^(5)(x)/5!), zeros skipped.
  int budan(double x) const {
    double a[6] = {c[0], c[1], c[2], c[3], c[4], 1.0};
    double taylor[6];
    for (int j = 0; j < 6; ++j) {  // repeated synthetic division by (t - x)
      const int len = 6 - j;
      double b[6];
      b[len - 1] = a[len - 1];
      for (int i = len - 2; i >= 0; --i) b[i] = a[i] + x * b[i + 1];
      taylor[j] = b[0];
      for (int i = 0; i < len - 1; ++i) a[i] = b[i + 1];
    }
    int count = 0;
    double last = 1.0;
    for (int j = 4; j >= 0; --j) {
      const double s = sgn(taylor[j]);
      if (s != 0) {
        if (s != last) ++count;
        last = s;
      }
    }
    return count;
  }

  // The single simple root in (lo, hi]: Newton steps kept inside a shrinking bracket.
  double root(double lo, double hi) const {
    double p0, dp0;
    eval(lo, p0, dp0);
    const double sign_lo = p0 != 0 ? sgn(p0) : sgn(dp0);
    double l = lo, u = hi, x = 0.5 * (lo + hi);
    for (int it = 0; it < kRootIters; ++it) {
      double p, dp;
      eval(x, p, dp);
      if (p == 0) break;
      if (sgn(p) == sign_lo) l = x; else u = x;
      const double newton = dp != 0 ? x - p / dp : 0.0;
      const double next = (dp != 0 && newton > l && newton < u) ? newton : 0.5 * (l + u);
      const bool moving = std::abs(next - x) > 4 * kEps * std::abs(next);
      x = next;
      if (!moving) break;
    }
    double ph, dph;
    eval(hi, ph, dph);
    return ph == 0 ? hi : x;
  }

  // Every root in (lo, hi] (vlo, vhi: Budan counts there), appended to roots.
  void isolate(double lo, double hi, int vlo, int vhi, int depth, double* roots, int& n) const {
    const int count = vlo - vhi;
    if (count <= 0 || n >= 5) return;
    if (count == 1) {
      roots[n++] = root(lo, hi);
      return;
    }
    const double mid = 0.5 * (lo + hi);
    if (depth >= kMaxDepth || mid <= lo || mid >= hi) {  // a multiple root, or a complex pair at the axis
      roots[n++] = mid;
      return;
    }
    const int vmid = budan(mid);
    isolate(lo, mid, vlo, vmid, depth + 1, roots, n);
    isolate(mid, hi, vmid, vhi, depth + 1, roots, n);
  }
};

// (a, b, c, 0) for c = x / lam with (a, b) optimal given c.
inline void abc(double x, const double* y, double lam, double* u) {
  const double one_p = 1.0 + x;
  const double one_m = std::max(1.0 - x, kTiny);
  const double delta = y[0] == y[1] ? 0.0 : (y[0] - y[1]) / (one_m * one_p);
  u[0] = delta + y[1] / one_p;
  u[1] = -delta + y[0] / one_p;
  u[2] = x / lam;
  u[3] = 0.0;
}

// Best stationary point with support {1, 2, 3}; false when there is none.
inline bool three_nonzero(const double* y, double lam, double* u) {
  const double k = lam * y[2];
  const double l2 = lam * lam;
  Quintic q{{-k + l2 * y[0] * y[1], 1 - l2 * (y[0] * y[0] + y[1] * y[1]), 2 * k + l2 * y[0] * y[1], -2.0, -k}};
  const double hi = std::min(std::min(k, y[1] / y[0]), 1.0);
  const int v0 = q.budan(0.0);
  const int vhi = q.budan(hi);
  if (v0 - vhi <= 0) return false;
  double roots[5];
  int n = 0;
  q.isolate(0.0, hi, v0, vhi, 0, roots, n);
  double best = INFINITY;
  for (int i = 0; i < n; ++i) {
    double cand[4];
    abc(roots[i], y, lam, cand);
    const double f = objective(cand, y, lam);
    if (f < best) {
      best = f;
      std::copy(cand, cand + 4, u);
    }
  }
  return n > 0;
}

// ---------------------------------------------------------------- four non-zeros

struct Pair {
  double resid, q, d1, d2;
  bool defined;
};

// The reduced stationarity system at p = u1 + u2 (see _pair_system in proximal.py).
inline Pair pair_system(double p, const double* y, double lam) {
  Pair r;
  const double one_p = 1 - lam * p;
  const double d34 = y[2] - y[3], d12 = y[0] - y[1];
  r.d2 = d34 == 0 ? 0.0 : d34 / std::max(one_p, kTiny);
  const double cst = p - 0.5 * lam * r.d2 * r.d2 - (y[0] + y[1]);
  r.q = (std::sqrt(std::max((lam * p) * (lam * p) - 2 * lam * cst, 0.0)) - lam * p) / lam;
  const double one_q = 1 - lam * r.q;
  r.d1 = d12 == 0 ? 0.0 : d12 / std::max(one_q, kTiny);
  r.resid = r.q + lam * p * r.q + 0.5 * lam * (p * p - r.d1 * r.d1) - (y[2] + y[3]);
  r.defined = one_p > 0 && one_q > 0 && cst < 0;
  return r;
}

// Root of R in [a, b] (fa * fb <= 0) by the Illinois variant of regula falsi.
inline double illinois(const double* y, double lam, double a, double b, double fa, double fb) {
  double side = 0.0;
  for (int it = 0; it < kRootIters; ++it) {
    const double den = fb - fa;
    double c = den != 0 ? (a * fb - b * fa) / den : 0.5 * (a + b);
    if (!(c > std::min(a, b) && c < std::max(a, b))) c = 0.5 * (a + b);
    const double fc = pair_system(c, y, lam).resid;
    if (sgn(fc) == sgn(fa)) {  // the root lies between c and b
      fa = fc;
      if (side > 0) fb *= 0.5;
      a = c;
      side = 1.0;
    } else {
      if (side < 0) fa *= 0.5;
      fb = fc;
      b = c;
      side = -1.0;
    }
    if (!(std::abs(b - a) > 1e-13 * (std::abs(a) + std::abs(b))) || fc == 0) break;
  }
  return std::abs(fa) <= std::abs(fb) ? a : b;
}

// Stationary points with four non-zeros (at most kBrackets); returns how many.
inline int four_nonzero(const double* y, double lam, double (*out)[4]) {
  const double top = std::min(y[0] + y[1], 1 / lam);
  Pair prev = pair_system(top * kP.at[0], y, lam);
  int n = 0;
  for (int j = 1; j < kGrid && n < kBrackets; ++j) {
    const double p = top * kP.at[j];
    const Pair cur = pair_system(p, y, lam);
    if (prev.defined && cur.defined && sgn(prev.resid) * sgn(cur.resid) <= 0) {
      const double root = illinois(y, lam, top * kP.at[j - 1], p, prev.resid, cur.resid);
      const Pair at = pair_system(root, y, lam);
      out[n][0] = (root + at.d1) / 2;
      out[n][1] = (root - at.d1) / 2;
      out[n][2] = (at.q + at.d2) / 2;
      out[n][3] = (at.q - at.d2) / 2;
      ++n;
    }
    prev = cur;
  }
  return n;
}

// ---------------------------------------------------------------- one group

struct Group {
  double y[4];  // |z| sorted decreasingly
  int rank[4];  // z[i] holds y[rank[i]]
};

// Branch-free (random signs and orders would defeat the branch predictor): the rank of
// each magnitude, ties ranked by position (a stable sort), then y placed by rank.
template <typename T>
inline void sort_group(const T* z, Group& g) {
  double a[4];
  for (int i = 0; i < 4; ++i) a[i] = std::abs(static_cast<double>(z[i]));
  for (int i = 0; i < 4; ++i) {
    int r = 0;
    for (int j = 0; j < 4; ++j) r += (a[j] > a[i]) | ((a[j] == a[i]) & (j < i));
    g.rank[i] = r;
  }
  for (int i = 0; i < 4; ++i) g.y[i] = NAN;  // only a NaN input leaves a rank unfilled
  for (int i = 0; i < 4; ++i) g.y[g.rank[i]] = a[i];
}

// out = u (in the sorted order of g) with the signs and positions of z.
template <typename T>
inline void scatter(const T* z, const Group& g, const double* u, T* out) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<T>(std::copysign(u[g.rank[i]], static_cast<double>(z[i])));
}

// Every case but the convex one: returns false when the group is live and convex (the
// caller runs the descent), else true with the answer in u.
inline bool settle(const double* y, double lam, double* u) {
  u[0] = y[0];
  u[1] = y[1];
  u[2] = u[3] = 0.0;
  if (lam == 0.0) {
    u[2] = y[2];
    u[3] = y[3];
    return true;
  }
  const double rho = std::sqrt(y[2] * y[2] + y[3] * y[3]);
  const double floor = lam * std::max(y[0] - rho, 0.0) * std::max(y[1] - rho, 0.0);
  if (!(y[2] > floor)) return true;  // screened: the 2-sparse point
  if (2.0 * lam * (y[0] + y[1] + y[2]) < 1.0) return false;
  // not convex: the best stationary point, if any beats the 2-sparse one
  const double best_f = objective(u, y, lam);
  double cand[1 + kBrackets][4];
  int n = 0;
  if (three_nonzero(y, lam, cand[0])) n = 1;
  if (y[3] > floor) n += four_nonzero(y, lam, cand + n);
  int pick = -1;
  double pick_f = INFINITY;
  for (int i = 0; i < n; ++i) {
    const double f = objective(cand[i], y, lam);
    if (f < pick_f) {
      pick_f = f;
      pick = i;
    }
  }
  if (pick >= 0 && pick_f < best_f) std::copy(cand[pick], cand[pick] + 4, u);
  return true;
}

// Coordinate descent for kLanes convex groups at once (the lanes are independent, so the
// compiler vectorises across them; one group alone is bound by the latency of its
// sequential updates). Each lane stops updating after the first sweep that changes no
// coordinate by more than its tolerance, as a lone group would.
constexpr int kLanes = 8;

template <typename T>
struct ConvexBatch {
  const T* z;
  T* out;
  bool* pending;
  int n = 0;
  int64_t index[kLanes];
  Group group[kLanes];
  double lam[kLanes];

  void add(int64_t g, const Group& grp, double l) {
    index[n] = g;
    group[n] = grp;
    lam[n] = l;
    if (++n == kLanes) flush();
  }

  void flush() {
    if (n == 0) return;
    alignas(64) double y[4][kLanes], c[4][kLanes], lm[kLanes], tol[kLanes], active[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const int src = l < n ? l : 0;  // spare lanes repeat the first group; their result is unused
      for (int i = 0; i < 4; ++i) y[i][l] = c[i][l] = group[src].y[i];
      lm[l] = lam[src];
      tol[l] = 1e-13 * (1.0 + group[src].y[0]);
      active[l] = 1.0;
    }
    for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
      double change[kLanes] = {0.0};
      for (int i = 0; i < 4; ++i) {
        const int a = i == 0 ? 1 : 0, b = i <= 1 ? 2 : 1, d = i <= 2 ? 3 : 2;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const double fresh = std::max(y[i][l] - lm[l] * (c[a][l] * c[b][l] + c[d][l] * (c[a][l] + c[b][l])), 0.0);
          const double moved = active[l] != 0.0 ? fresh : c[i][l];
          change[l] = std::max(change[l], std::abs(moved - c[i][l]));
          c[i][l] = moved;
        }
      }
      bool any = false;
      for (int l = 0; l < kLanes; ++l) {
        active[l] = (active[l] != 0.0 && change[l] > tol[l]) ? 1.0 : 0.0;
        any = any || active[l] != 0.0;
      }
      if (!any) break;
    }
    for (int l = 0; l < n; ++l) {
      const int64_t g = index[l];
      if (active[l] != 0.0) {  // not converged: the Python operator takes it
        pending[g] = true;
        for (int i = 0; i < 4; ++i) out[4 * g + i] = 0;
        continue;
      }
      const double* yl = group[l].y;
      double u[4] = {yl[0], yl[1], 0.0, 0.0};
      const double cl[4] = {c[0][l], c[1][l], c[2][l], c[3][l]};
      if (objective(cl, yl, lam[l]) < objective(u, yl, lam[l])) std::copy(cl, cl + 4, u);
      scatter(z + 4 * g, group[l], u, out + 4 * g);
    }
    n = 0;
  }
};

std::tuple<at::Tensor, at::Tensor> prox24_cpu(const at::Tensor& z, const at::Tensor& lam) {
  TORCH_CHECK(z.dim() == 2 && z.size(1) == 4, "prox24: z must be [groups, 4], got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kDouble || z.scalar_type() == at::kFloat, "prox24: z must be float32 or float64");
  TORCH_CHECK(lam.scalar_type() == at::kDouble, "prox24: lam must be float64");
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == z.size(0), "prox24: lam must hold one weight per group");
  const at::Tensor zc = z.contiguous();
  const at::Tensor lc = lam.contiguous();
  const int64_t groups = zc.size(0);
  at::Tensor out = at::empty_like(zc);
  at::Tensor pending = at::zeros({groups}, zc.options().dtype(at::kBool));
  const double* lp = lc.data_ptr<double>();
  bool* pp = pending.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "prox24", [&] {
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, groups, 2048, [&](int64_t begin, int64_t end) {
      ConvexBatch<scalar_t> batch{zp, op, pp};
      Group grp;
      double u[4];
      for (int64_t g = begin; g < end; ++g) {
        sort_group(zp + 4 * g, grp);
        if (settle(grp.y, lp[g], u)) {
          scatter(zp + 4 * g, grp, u, op + 4 * g);
        } else {
          batch.add(g, grp, lp[g]);
        }
      }
      batch.flush();
    });
  });
  return {out, pending};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(graphprune, m) {
  m.def("prox24(Tensor z, Tensor lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(graphprune, CPU, m) {
  m.impl("prox24", &prox24_cpu);
}
