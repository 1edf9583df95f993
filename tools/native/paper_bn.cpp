// A native (C++) forward and backward of JSBN2d with estimator 'paper' on CPU, for
// tools/benchmark_native.py only: it measures what moving the layer's per-call Python (the
// autograd Function body, the estimator's C-vector ops and host reads) into one native
// call per direction would gain. Same full-tensor passes as robustbn's lean path (BatchNorm
// kernels); the per-channel estimator math is plain loops in double. Not a product path:
// float32 contiguous NCHW, local statistics, C >= 3, finite statistics, no guards; the
// passes are chunked by whole samples only (the layer splits samples above 2^20 values
// into blocks of channels).
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

constexpr double kUnitEps = 1e-30;  // 1 + eps == 1: a variance of 1 normalizes by exactly 1
constexpr int64_t kChunk = int64_t(1) << 20;

// (mean, biased variance) per channel: the three passes of robustbn.functional
// (_moments_by_passes), in chunks of whole samples of at most kChunk values.
std::pair<at::Tensor, at::Tensor> moments(const at::Tensor& x, bool passes) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  if (!passes) {
    auto mv = at::batch_norm_update_stats(x, {}, {}, 0.0);
    return {std::get<0>(mv), std::get<1>(mv)};
  }
  const int64_t c = x.size(1), n = x.numel() / c;
  at::Tensor mean = x.mean(dims);
  at::Tensor ones = at::ones({c}, x.options());
  at::Tensor zeros = at::zeros({c}, x.options());
  at::Tensor n2 = at::full({c}, double(n) * double(n), x.options());
  const int64_t per = std::max<int64_t>(1, kChunk / (x.numel() / x.size(0)));
  at::Tensor var;
  for (const auto& part : x.split(per)) {
    at::Tensor d = at::batch_norm(part, {}, {}, mean, ones, false, 0.0, kUnitEps, false);
    at::Tensor s = std::get<1>(at::native_batch_norm_backward(
        d, d, {}, zeros, n2, {}, {}, false, 0.0, {false, true, false}));
    var = var.defined() ? var.add_(s) : s;
  }
  return {mean, var};
}

}  // namespace

// y and what the backward needs: (y, m, v, mu, var, state = [a, alpha, beta, r, shift/C, N]).
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, at::Tensor running_mean,
                                at::Tensor running_var, double momentum, double eps,
                                bool passes) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) >= 3,
              "prototype: contiguous float32 input with at least 3 channels");
  const int64_t c = x.size(1);
  const double n = double(x.numel() / c), cd = double(c);
  auto [m, v] = moments(x, passes);
  const float* mp = m.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  // mean shrunk toward zero: a = 1 - kc s2 / ||m||^2, kc = (C - 2) C / (C + 1)
  double mbar = 0, log_sum = 0;
  for (int64_t i = 0; i < c; ++i) { mbar += mp[i]; log_sum += std::log(double(vp[i])); }
  mbar /= cd;
  double s2 = 0;
  for (int64_t i = 0; i < c; ++i) s2 += (mp[i] - mbar) * (mp[i] - mbar);
  s2 /= cd;
  const double kc = (cd - 2) * cd / (cd + 1), q = cd * (s2 + mbar * mbar);
  const double a = q > 0 ? 1 - kc * s2 / q : 1.0;
  const double alpha = q > 0 ? -2 * kc / (cd * q) + 2 * kc * s2 / (q * q) : 0.0;
  const double beta = q > 0 ? 2 * kc * mbar / (cd * q) : 0.0;
  // variance: r v + M geometric-mean(v), r = N / (N + 1)
  const double r = n / (n + 1);
  const double mult = std::max(0.0, 4 * (cd - 1) * r / ((n - 1) * cd + 2));
  const double shift = mult * std::exp(log_sum / cd);
  at::Tensor mu = at::empty({c}, m.options()), var = at::empty({c}, m.options());
  float* mup = mu.data_ptr<float>();
  float* varp = var.data_ptr<float>();
  float* rmp = running_mean.data_ptr<float>();
  float* rvp = running_var.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    mup[i] = float(a * mp[i]);
    varp[i] = float(r * vp[i] + shift);
    rmp[i] += float(momentum) * (mup[i] - rmp[i]);
    rvp[i] += float(momentum) * (varp[i] * float(n / (n - 1)) - rvp[i]);
  }
  at::Tensor y = at::batch_norm(x, weight, bias, mu, var, false, 0.0, eps, false);
  at::Tensor state = at::tensor({a, alpha, beta, r, shift / cd, n}, at::kDouble);
  return {y, m, v, mu, var, state};
}

// (dx, dweight, dbias): dx = w' g + k (x - m) + c with w' = weight invstd and (k, c) from
// the estimator's closed-form VJP (robustbn/lean.py, _paper_backward).
std::vector<at::Tensor> backward(const at::Tensor& g, const at::Tensor& x,
                                 const at::Tensor& weight, const at::Tensor& m,
                                 const at::Tensor& v, const at::Tensor& mu,
                                 const at::Tensor& var, const at::Tensor& state, double eps) {
  auto sums = at::native_batch_norm_backward(g, x, {}, mu, var, {}, {}, false, eps,
                                             {false, true, true});
  at::Tensor sum_gx = std::get<1>(sums), sum_g = std::get<2>(sums);
  const int64_t c = x.size(1);
  const double* st = state.data_ptr<double>();
  const double a = st[0], alpha = st[1], beta = st[2], r = st[3], shift_c = st[4], n = st[5];
  const float *mp = m.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *varp = var.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float *sg = sum_g.data_ptr<float>(), *sgx = sum_gx.data_ptr<float>();
  std::vector<double> wq(c), p(c), qv(c);
  double sum_q = 0, dot_pm = 0;
  for (int64_t i = 0; i < c; ++i) {
    const double invstd = 1 / std::sqrt(double(varp[i]) + eps);
    wq[i] = invstd * wp[i];
    p[i] = wq[i] * sg[i];
    qv[i] = wq[i] * invstd * sgx[i];
    sum_q += qv[i];
    dot_pm += p[i] * mp[i];
  }
  const double gamma = -shift_c * sum_q / n, gu = -dot_pm;
  at::Tensor k = at::empty({c}, m.options()), cv = at::empty({c}, m.options());
  at::Tensor wt = at::empty({c}, m.options());
  float *kp = k.data_ptr<float>(), *cp = cv.data_ptr<float>(), *wtp = wt.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    kp[i] = float(gamma / vp[i] - r / n * qv[i]);
    cp[i] = float(-a / n * p[i] + gu * alpha / n * mp[i] + gu * beta / n);
    wtp[i] = float(wq[i]);
  }
  at::Tensor ones = at::ones({c}, m.options());
  at::Tensor dx = at::batch_norm(x, k, cv, m, ones, false, 0.0, kUnitEps, false);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = c;
  dx.addcmul_(g, wt.view(shape));
  return {dx, sum_gx, sum_g};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("forward", &forward);
  mod.def("backward", &backward);
}
