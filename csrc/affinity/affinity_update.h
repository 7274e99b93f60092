// The proximal inter-task affinity update (docs/algorithm.md §Affinity update),
// written once for every backend as a map over the (source, target) pairs (team.h). Every pair reads only `before`, `after` and the group
// mask (never another pair's updated affinity), so the pairs are independent and
// the whole K×K update is a single elementwise pass.
#pragma once

#include <cstdint>

#include "../team.h"

namespace selgroup {

// True for a positive finite number (the only losses a ratio may be taken of).
// Written with comparisons only, so that it is the same on host and device.
template <typename T>
SELGROUP_HD_INLINE bool positive_finite(T x) {
  return x > T(0) && x - x == T(0);
}

template <typename T>
SELGROUP_HD_INLINE bool is_finite(T x) {
  return x - x == T(0);
}

// |G|: how many tasks the group mask marks.
SELGROUP_HD_INLINE int64_t group_size(const bool* group_mask, int64_t num_tasks) {
  int64_t size = 0;
  for (int64_t k = 0; k < num_tasks; ++k) size += group_mask[k] ? 1 : 0;
  return size;
}

// Updates A[source, target] in place (A addressed through its strides). `size` is |G|.
// Does nothing when the source is outside the group or a rule says to skip the pair.
template <typename T>
SELGROUP_HD_INLINE void affinity_update_pair(T* affinity, int64_t stride_source, int64_t stride_target,
                                             const T* before, const T* after, const bool* group_mask,
                                             int64_t size, T decay, int64_t source, int64_t target) {
  if (!group_mask[source]) return;  // only the group's own tasks are sources
  const T before_target = before[target];
  if (!positive_finite(before_target)) return;
  const T rate_target = (T(1) - after[target] / before_target) / T(size);
  if (!is_finite(rate_target)) return;

  T value = rate_target;
  if (group_mask[target]) {
    // Intra-group pair: the sign rule needs the source's own rate as well.
    const T before_source = before[source];
    if (!positive_finite(before_source)) return;
    const T rate_source = (T(1) - after[source] / before_source) / T(size);
    if (!is_finite(rate_source)) return;
    if (source == target) {
      if (rate_target < T(0)) return;  // self-affinity never goes negative
    } else if (rate_target * rate_source < T(0)) {
      // One loss fell while the other rose: the two tasks transfer negatively.
      value = -(rate_target > rate_source ? rate_target : rate_source);
    }
  }
  T& entry = affinity[source * stride_source + target * stride_target];
  const T updated = (T(1) - decay) * entry + decay * value;
  if (is_finite(updated)) entry = updated;
}

// The whole K×K update as a map over the pairs (source·K + target).
template <typename T>
struct AffinityUpdate {
  T* affinity;
  int64_t stride_source, stride_target;
  const T* before;
  const T* after;
  const bool* group_mask;
  int64_t K;
  T decay;

  static constexpr int64_t kGrain = int64_t(1) << 16;
  SELGROUP_HD_INLINE int64_t count() const { return K * K; }
  using Shared = int64_t;  // |G|
  SELGROUP_HD_INLINE Shared prepare() const { return group_size(group_mask, K); }
  SELGROUP_HD_INLINE void operator()(Shared size, int64_t begin, int64_t end) const {
    if (size == 0) return;  // an empty group updated nothing
    for (int64_t pair = begin; pair < end; ++pair)
      affinity_update_pair(affinity, stride_source, stride_target, before, after, group_mask, size, decay, pair / K,
                           pair % K);
  }
};

}  // namespace selgroup
