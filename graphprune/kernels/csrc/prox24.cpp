// graphprune::prox24 -- the common cases of the exact 2:4 proximal operator, per group.
//
// For every group z of four values and weight lam >= 0 the operator is
//   prox(z) = argmin_u 0.5 |u - z|^2 + lam * sum_{i<j<k} |u_i u_j u_k|
// (graphprune/solvers/proximal.py derives it). With y = |z| sorted decreasingly:
//   * lam == 0: u = y;
//   * the 2-sparse point (y1, y2, 0, 0) is the answer unless y3 > lam (y1 - r)+ (y2 - r)+
//     with r = |(y3, y4)| (the screen: no point with a third non-zero can beat it);
//   * if 2 lam (y1 + y2 + y3) < 1 the objective is strictly convex on the box [0, y]
//     and exact coordinate descent converges to its minimiser, taken when it beats the
//     2-sparse point.
// Those are most groups at every step of the proximal solver. The rest -- live groups
// where the objective is not convex (the stationary points with three or four non-zeros
// are searched for there), and convex groups whose descent has not met its tolerance
// after kMaxSweeps sweeps -- are flagged in `pending`, and the Python operator computes
// them. The answer carries the signs of z and its order (a stable sort: of equal
// magnitudes the earlier input ranks first).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kMaxSweeps = 256;

inline double objective(const double* u, const double* y, double lam) {
  double q = 0.0;
  for (int i = 0; i < 4; ++i) q += (u[i] - y[i]) * (u[i] - y[i]);
  return 0.5 * q + lam * (u[0] * u[1] * (u[2] + u[3]) + u[2] * u[3] * (u[0] + u[1]));
}

// Returns true when the group is settled here, false when the Python operator must take it.
inline bool prox_group(const double* z, double lam, double* out) {
  double y[4];
  int order[4];
  for (int i = 0; i < 4; ++i) {
    order[i] = i;
    y[i] = std::abs(z[i]);
  }
  for (int i = 1; i < 4; ++i) {  // insertion sort, decreasing, stable
    for (int j = i; j > 0 && y[j] > y[j - 1]; --j) {
      std::swap(y[j], y[j - 1]);
      std::swap(order[j], order[j - 1]);
    }
  }
  double u[4] = {y[0], y[1], 0.0, 0.0};
  if (lam == 0.0) {
    u[2] = y[2];
    u[3] = y[3];
  } else {
    const double rho = std::sqrt(y[2] * y[2] + y[3] * y[3]);
    const double floor = lam * std::max(y[0] - rho, 0.0) * std::max(y[1] - rho, 0.0);
    if (y[2] > floor) {  // live: a point with a third non-zero may win
      if (!(2.0 * lam * (y[0] + y[1] + y[2]) < 1.0)) return false;
      double c[4] = {y[0], y[1], y[2], y[3]};
      const double tol = 1e-13 * (1.0 + y[0]);
      bool converged = false;
      for (int sweep = 0; sweep < kMaxSweeps && !converged; ++sweep) {
        double change = 0.0;
        for (int i = 0; i < 4; ++i) {
          double o[3];
          for (int j = 0, k = 0; j < 4; ++j)
            if (j != i) o[k++] = c[j];
          const double fresh = std::max(y[i] - lam * (o[0] * o[1] + o[2] * (o[0] + o[1])), 0.0);
          change = std::max(change, std::abs(fresh - c[i]));
          c[i] = fresh;
        }
        converged = change <= tol;
      }
      if (!converged) return false;
      if (objective(c, y, lam) < objective(u, y, lam)) std::copy(c, c + 4, u);
    }
  }
  for (int i = 0; i < 4; ++i) {
    const double s = z[order[i]];
    out[order[i]] = s > 0 ? u[i] : (s < 0 ? -u[i] : 0.0);
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> prox24_cpu(const at::Tensor& z, const at::Tensor& lam) {
  TORCH_CHECK(z.dim() == 2 && z.size(1) == 4, "prox24: z must be [groups, 4], got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kDouble && lam.scalar_type() == at::kDouble, "prox24: z and lam must be float64");
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == z.size(0), "prox24: lam must hold one weight per group");
  const at::Tensor zc = z.contiguous();
  const at::Tensor lc = lam.contiguous();
  const int64_t groups = zc.size(0);
  at::Tensor out = at::zeros_like(zc);
  at::Tensor pending = at::zeros({groups}, zc.options().dtype(at::kBool));
  const double* zp = zc.data_ptr<double>();
  const double* lp = lc.data_ptr<double>();
  double* op = out.data_ptr<double>();
  bool* pp = pending.data_ptr<bool>();
  at::parallel_for(0, groups, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) pp[g] = !prox_group(zp + 4 * g, lp[g], op + 4 * g);
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
