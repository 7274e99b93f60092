// The torch side of every op, written once over a backend policy: input checks
// (every backend rejects the same inputs with the same messages), the functor of
// csrc/all.h built from the tensors, and the backend that runs it.
//
// A Backend says where a functor runs:
//   struct Backend {
//     static constexpr bool kHost;  // tensors in host memory: values may be read without a sync
//     struct DeviceScope { explicit DeviceScope(const at::Tensor& input); };  // checks the device, makes it current
//     template <typename Solver> static void solve(const Solver&, const at::Tensor& like, const char* op);  // one team
//     template <typename Map> static void map(const Map&, const char* op);  // a map over Map::count() indices
//     static TieBreakingNoise tie_breaking_noise(int64_t count);  // affinity propagation's normals, or null
//   };
// csrc/cpu/ops_cpu.cpp (a serial team, OpenMP threads for large problems) and
// csrc/cuda/ops_cuda.cpp (one block; a grid for maps) define one each and register
// every op with register_ops<Backend>. Includes torch headers: never include it
// from a .cu file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "all.h"

namespace selgroup {
namespace bindings {

using namespace selgroup::manipulation;

// K² standard normals (affinity propagation's tie-breaking noise), shared while an op uses them.
using TieBreakingNoise = std::shared_ptr<const std::vector<double>>;

// ---- input checks ------------------------------------------------------------

// float32 or float64: the dtypes every op supports.
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// A square K×K matrix with K >= 1; returns K.
inline int64_t check_square(const at::Tensor& t, const char* name) {
  check_dim(t, 2, name);
  TORCH_CHECK(t.size(0) == t.size(1), name, " must be square (K×K), got shape ", t.sizes());
  TORCH_CHECK(t.size(0) >= 1, name, " must have at least one row, got shape ", t.sizes());
  return t.size(0);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " is ", t.scalar_type(), " but ", ref_name, " is ",
              ref.scalar_type());
}

// float[K] with like's dtype and device.
inline void check_task_vector(const at::Tensor& vector, const at::Tensor& like, int64_t K, const char* name,
                              const char* like_name) {
  check_same_dtype(vector, like, name, like_name);
  check_same_device(vector, like, name, like_name);
  TORCH_CHECK(vector.dim() == 1 && vector.size(0) == K, name, " must have shape [", K, "], got ", vector.sizes());
}

// A float32/float64 K×K Gram matrix; returns K.
inline int check_gram(const at::Tensor& gram) {
  check_float(gram, "gram");
  const int64_t K = check_square(gram, "gram");
  TORCH_CHECK(K <= (1 << 15), "gram: K = ", K, " tasks is beyond what a K×K solver is meant for");
  return static_cast<int>(K);
}

inline void check_iterations(int64_t max_iter, double tol, const char* op) {
  TORCH_CHECK(max_iter >= 0 && max_iter <= (1LL << 30), op, ": max_iter must be in [0, 2^30], got ", max_iter);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0.0, op, ": tol must be finite and >= 0, got ", tol);
}

// int64 K×K on gram's device. Its values (a permutation per row) are not checked:
// that would synchronise on CUDA; entries outside [0, K) are skipped by the kernel.
inline void check_order(const at::Tensor& order, const at::Tensor& gram, int K) {
  TORCH_CHECK(order.scalar_type() == at::kLong, "order must be int64, got ", order.scalar_type());
  check_same_device(order, gram, "order", "gram");
  TORCH_CHECK(order.dim() == 2 && order.size(0) == K && order.size(1) == K, "order must be K×K = ", K, "×", K,
              " like gram, got shape ", order.sizes());
}

// Returns K.
inline int64_t check_affinity_update(const at::Tensor& affinity, const at::Tensor& before, const at::Tensor& after,
                                     const at::Tensor& group_mask, double decay) {
  check_float(affinity, "affinity");
  const int64_t K = check_square(affinity, "affinity");
  TORCH_CHECK(at::has_internal_overlap(affinity) != at::MemOverlap::Yes,
              "affinity is updated in place and must not have overlapping memory (e.g. an expanded tensor)");
  for (const auto& [tensor, name] : {std::pair<const at::Tensor&, const char*>{before, "before"},
                                     std::pair<const at::Tensor&, const char*>{after, "after"}}) {
    check_same_device(tensor, affinity, name, "affinity");
    check_same_dtype(tensor, affinity, name, "affinity");
    check_dim(tensor, 1, name);
    TORCH_CHECK(tensor.size(0) == K, name, " must hold K = ", K, " losses, got shape ", tensor.sizes());
  }
  check_same_device(group_mask, affinity, "group_mask", "affinity");
  TORCH_CHECK(group_mask.scalar_type() == at::kBool, "group_mask must be bool, got ", group_mask.scalar_type());
  check_dim(group_mask, 1, "group_mask");
  TORCH_CHECK(group_mask.size(0) == K, "group_mask must have K = ", K, " entries, got shape ", group_mask.sizes());
  TORCH_CHECK_VALUE(decay > 0.0 && decay <= 1.0, "decay must be in (0, 1], got ", decay);
  return K;
}

inline int64_t check_affinity_propagation(const at::Tensor& similarity, std::optional<double> preference,
                                          double damping, int64_t max_iter, int64_t convergence_iter) {
  check_float(similarity, "similarity");
  const int64_t K = check_square(similarity, "similarity");
  TORCH_CHECK_VALUE(!preference.has_value() || std::isfinite(*preference), "preference must be finite, got ",
                    *preference);
  TORCH_CHECK_VALUE(damping >= 0.5 && damping < 1.0, "damping must be in [0.5, 1), got ", damping);
  // At most 2^30: the run lengths of the exemplar flags are int.
  TORCH_CHECK_VALUE(max_iter >= 1 && max_iter <= (1LL << 30), "max_iter must be in [1, 2^30], got ", max_iter);
  TORCH_CHECK_VALUE(convergence_iter >= 1, "convergence_iter must be >= 1, got ", convergence_iter);
  return K;
}

// ---- the ops -----------------------------------------------------------------

// The scalar type a solver is built for, from the weights pointer it gets.
template <typename Pointer>
using pointee_t = std::remove_cv_t<std::remove_pointer_t<Pointer>>;

// weights[K] = the solver made by `make(gram_data, weights_data)`, run on `Backend`.
template <typename Backend, typename MakeSolver>
at::Tensor solve_weights(const at::Tensor& gram_in, const char* op, MakeSolver make) {
  const typename Backend::DeviceScope scope(gram_in);
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({gram.size(0)}, gram.options());
  // check_gram already rejected other dtypes, so the dispatch's name (a literal) never shows.
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "solve_weights", [&] {
    Backend::solve(make(gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>()), gram, op);
  });
  return weights;
}

template <typename Backend>
at::Tensor pcgrad_weights(const at::Tensor& gram, const at::Tensor& order_in) {
  const int K = check_gram(gram);
  check_order(order_in, gram, K);
  const at::Tensor order = order_in.contiguous();
  return solve_weights<Backend>(gram, "pcgrad_weights", [&](const auto* g, auto* w) {
    return PCGradWeights<pointee_t<decltype(w)>>{g, order.const_data_ptr<int64_t>(), w, K};
  });
}

template <typename Backend>
at::Tensor mgda_weights(const at::Tensor& gram, int64_t max_iter, double tol) {
  const int K = check_gram(gram);
  check_iterations(max_iter, tol, "mgda_weights");
  return solve_weights<Backend>(gram, "mgda_weights", [&](const auto* g, auto* w) {
    return MGDAWeights<pointee_t<decltype(w)>>{g, w, K, static_cast<int>(max_iter), tol};
  });
}

template <typename Backend>
at::Tensor cagrad_weights(const at::Tensor& gram, double c, int64_t rescale, int64_t max_iter, double tol) {
  const int K = check_gram(gram);
  TORCH_CHECK(std::isfinite(c) && c >= 0.0, "cagrad_weights: c must be finite and >= 0, got ", c);
  TORCH_CHECK(rescale >= 0 && rescale <= 2, "cagrad_weights: rescale must be 0, 1 or 2, got ", rescale);
  check_iterations(max_iter, tol, "cagrad_weights");
  return solve_weights<Backend>(gram, "cagrad_weights", [&](const auto* g, auto* w) {
    return CAGradWeights<pointee_t<decltype(w)>>{g, w, K, c, static_cast<int>(rescale), static_cast<int>(max_iter),
                                                 tol};
  });
}

template <typename Backend>
at::Tensor imtl_weights(const at::Tensor& gram) {
  const int K = check_gram(gram);
  return solve_weights<Backend>(gram, "imtl_weights", [&](const auto* g, auto* w) {
    return IMTLWeights<pointee_t<decltype(w)>>{g, w, K};
  });
}

template <typename Backend>
at::Tensor aligned_mtl_weights(const at::Tensor& gram, c10::string_view scale_mode) {
  const int K = check_gram(gram);
  const AlignedScale scale = scale_mode == "min"      ? AlignedScale::kMin
                             : scale_mode == "median" ? AlignedScale::kMedian
                                                      : AlignedScale::kRmse;
  TORCH_CHECK(scale != AlignedScale::kRmse || scale_mode == "rmse",
              "aligned_mtl_weights: scale_mode must be 'min', 'median' or 'rmse', got '", scale_mode, "'");
  return solve_weights<Backend>(gram, "aligned_mtl_weights", [&](const auto* g, auto* w) {
    return AlignedMTLWeights<pointee_t<decltype(w)>>{g, w, K, scale};
  });
}

template <typename Backend>
at::Tensor nash_mtl_weights(const at::Tensor& gram, const at::Tensor& alpha_init_in, int64_t max_iter, double tol) {
  const int K = check_gram(gram);
  check_task_vector(alpha_init_in, gram, K, "alpha_init", "gram");
  check_iterations(max_iter, tol, "nash_mtl_weights");
  const at::Tensor alpha_init = alpha_init_in.contiguous();
  return solve_weights<Backend>(gram, "nash_mtl_weights", [&](const auto* g, auto* w) {
    using T = pointee_t<decltype(w)>;
    return NashMTLWeights<T>{{g, alpha_init.const_data_ptr<T>(), w, K, static_cast<int>(max_iter), tol, 1.0}};
  });
}

template <typename Backend>
at::Tensor fairgrad_weights(const at::Tensor& gram, double alpha, int64_t max_iter, double tol) {
  const int K = check_gram(gram);
  TORCH_CHECK(alpha >= 0.0 && std::isfinite(alpha), "fairgrad_weights: alpha must be finite and >= 0, got ", alpha);
  check_iterations(max_iter, tol, "fairgrad_weights");
  return solve_weights<Backend>(gram, "fairgrad_weights", [&](const auto* g, auto* w) {
    using T = pointee_t<decltype(w)>;
    return FairGradWeights<T>{g, nullptr, w, K, static_cast<int>(max_iter), tol, alpha};
  });
}

template <typename Backend>
at::Tensor config_weights(const at::Tensor& gram, const at::Tensor& preference_in) {
  const int K = check_gram(gram);
  check_task_vector(preference_in, gram, K, "preference", "gram");
  const at::Tensor preference = preference_in.contiguous();
  return solve_weights<Backend>(gram, "config_weights", [&](const auto* g, auto* w) {
    using T = pointee_t<decltype(w)>;
    return ConFIGWeights<T>{g, preference.const_data_ptr<T>(), w, K};
  });
}

template <typename Backend>
at::Tensor pcd_weights(const at::Tensor& gram, const at::Tensor& scales_in, const at::Tensor& taus_in) {
  const int K = check_gram(gram);
  check_task_vector(scales_in, gram, K, "scales", "gram");
  check_task_vector(taus_in, gram, K - 1, "taus", "gram");
  const at::Tensor scales = scales_in.contiguous(), taus = taus_in.contiguous();
  return solve_weights<Backend>(gram, "pcd_weights", [&](const auto* g, auto* w) {
    using T = pointee_t<decltype(w)>;
    return PCDWeights<T>{g, scales.const_data_ptr<T>(), taus.const_data_ptr<T>(), w, K};
  });
}

// rows[N×K] -> their projections[N×K] (csrc/manipulation/dual_cone.h), all rows in one team.
template <typename Backend>
at::Tensor dual_cone_projection(const at::Tensor& gram_in, const at::Tensor& rows_in, double norm_eps,
                                double reg_eps) {
  const int K = check_gram(gram_in);
  check_same_dtype(rows_in, gram_in, "rows", "gram");
  check_same_device(rows_in, gram_in, "rows", "gram");
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.size(1) == K, "dual_cone_projection: rows must have shape [N, ", K,
              "], got ", rows_in.sizes());
  TORCH_CHECK(rows_in.size(0) <= (1 << 30), "dual_cone_projection: at most 2^30 rows, got ", rows_in.size(0));
  TORCH_CHECK(std::isfinite(norm_eps) && norm_eps >= 0.0, "dual_cone_projection: norm_eps must be finite and >= 0, got ",
              norm_eps);
  TORCH_CHECK(std::isfinite(reg_eps) && reg_eps >= 0.0, "dual_cone_projection: reg_eps must be finite and >= 0, got ",
              reg_eps);
  const typename Backend::DeviceScope scope(gram_in);
  const at::Tensor gram = gram_in.contiguous(), rows = rows_in.contiguous();
  at::Tensor projections = at::empty_like(rows);
  const int N = static_cast<int>(rows.size(0));
  // One scratch slot per worker that runs: the CPU's team is serial; a CUDA block has at most 256 threads
  // (csrc/cuda/kernels.cu), and the functor runs min(team size, slots) workers whatever the team.
  const int slots = Backend::kHost ? 1 : std::clamp(N, 1, 256);
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "dual_cone_projection", [&] {
    Backend::solve(DualConeProjection<scalar_t>{gram.const_data_ptr<scalar_t>(), rows.const_data_ptr<scalar_t>(),
                                                projections.mutable_data_ptr<scalar_t>(), K, N, norm_eps, reg_eps,
                                                slots},
                   gram, "dual_cone_projection");
  });
  return projections;
}

// GradDrop: K×P task gradients -> the update d[P].
template <typename Backend>
at::Tensor graddrop(const at::Tensor& jacobian_in, const at::Tensor& leak_in, int64_t seed, int64_t offset,
                    int64_t column_offset) {
  check_float(jacobian_in, "jacobian");
  TORCH_CHECK(column_offset >= 0, "column_offset must be >= 0, got ", column_offset);
  check_dim(jacobian_in, 2, "jacobian");
  const int64_t K = jacobian_in.size(0);
  TORCH_CHECK(K >= 1, "jacobian must have at least one task row, got shape ", jacobian_in.sizes());
  check_task_vector(leak_in, jacobian_in, K, "leak", "jacobian");
  const typename Backend::DeviceScope scope(jacobian_in);
  const at::Tensor jacobian = jacobian_in.contiguous(), leak = leak_in.contiguous();
  const int64_t P = jacobian.size(1);
  at::Tensor update = at::empty({P}, jacobian.options());
  AT_DISPATCH_FLOATING_TYPES(jacobian.scalar_type(), "graddrop", [&] {
    Backend::map(GradDrop<scalar_t>{jacobian.const_data_ptr<scalar_t>(), leak.const_data_ptr<scalar_t>(),
                                    update.mutable_data_ptr<scalar_t>(), K, P, seed, offset, column_offset},
                 "graddrop");
  });
  return update;
}

template <typename Backend>
void affinity_update_(at::Tensor affinity, const at::Tensor& before, const at::Tensor& after,
                      const at::Tensor& group_mask, double decay) {
  const int64_t K = check_affinity_update(affinity, before, after, group_mask, decay);
  const typename Backend::DeviceScope scope(affinity);
  const at::Tensor before_c = before.contiguous(), after_c = after.contiguous(), mask_c = group_mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES(affinity.scalar_type(), "affinity_update_", [&] {
    Backend::map(AffinityUpdate<scalar_t>{affinity.mutable_data_ptr<scalar_t>(), affinity.stride(0),
                                          affinity.stride(1), before_c.const_data_ptr<scalar_t>(),
                                          after_c.const_data_ptr<scalar_t>(), mask_c.const_data_ptr<bool>(), K,
                                          static_cast<scalar_t>(decay)},
                 "affinity_update_");
  });
}

template <typename Backend>
at::Tensor group_similarity(const at::Tensor& affinity) {
  check_float(affinity, "affinity");
  const int64_t K = check_square(affinity, "affinity");
  const typename Backend::DeviceScope scope(affinity);
  at::Tensor similarity = at::empty({K, K}, affinity.options());
  AT_DISPATCH_FLOATING_TYPES(affinity.scalar_type(), "group_similarity", [&] {
    Backend::map(GroupSimilarity<scalar_t>{affinity.const_data_ptr<scalar_t>(), affinity.stride(0),
                                           affinity.stride(1), K, similarity.mutable_data_ptr<scalar_t>()},
                 "group_similarity");
  });
  return similarity;
}

// Non-finite similarities: the kernel answers all −1 (a device cannot raise without
// a host sync); on the host that answer is then looked into, and a non-finite entry
// raises. (The kernel's own pass over the input finds them: a separate check here
// cost ~2 % of a call at K = 256, on one thread before the team starts.)
template <typename Backend>
at::Tensor affinity_propagation(const at::Tensor& similarity, std::optional<double> preference, double damping,
                                int64_t max_iter, int64_t convergence_iter) {
  const int64_t K = check_affinity_propagation(similarity, preference, damping, max_iter, convergence_iter);
  const typename Backend::DeviceScope scope(similarity);
  const at::Tensor input = similarity.contiguous();
  at::Tensor labels = at::empty({K}, similarity.options().dtype(at::kLong));
  const TieBreakingNoise noise = Backend::tie_breaking_noise(K * K);
  AT_DISPATCH_FLOATING_TYPES(similarity.scalar_type(), "affinity_propagation", [&] {
    const scalar_t* data = input.const_data_ptr<scalar_t>();
    int64_t* answer = labels.mutable_data_ptr<int64_t>();
    Backend::solve(AffinityPropagation<scalar_t>{data, answer, K, preference.has_value(),
                                                 static_cast<scalar_t>(preference.value_or(0.0)),
                                                 static_cast<scalar_t>(damping), max_iter, convergence_iter,
                                                 noise ? noise->data() : nullptr},
                   similarity, "affinity_propagation");
    if constexpr (Backend::kHost) {
      if (std::all_of(answer, answer + K, [](int64_t label) { return label == -1; }))
        for (int64_t e = 0; e < K * K; ++e)
          TORCH_CHECK_VALUE(is_finite(data[e]), "similarity must be finite, got ", data[e], " at (", e / K, ", ",
                            e % K, ")");
    }
  });
  return labels;
}

// Registers every op of csrc/all.h for `Backend` (inside a TORCH_LIBRARY_IMPL block).
template <typename Backend>
void register_ops(torch::Library& m) {
#define SELGROUP_REGISTER(name, Functor) m.impl(#name, &name<Backend>);
  SELGROUP_OPS(SELGROUP_REGISTER)
#undef SELGROUP_REGISTER
}

}  // namespace bindings
}  // namespace selgroup
