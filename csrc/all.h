// Every algorithm of the library, and the lists that drive every per-op
// instantiation (the CUDA launchers in csrc/cuda/kernels.cu, the registrations in
// csrc/bindings.h): X(op name, functor template), the functor being a team solver
// (csrc/workspace.h) or a map (csrc/team.h). No torch header: .cu files include it.
#pragma once

#include "affinity/affinity_propagation.h"
#include "affinity/affinity_update.h"
#include "affinity/group_similarity.h"
#include "manipulation/aligned_mtl.h"
#include "manipulation/cagrad.h"
#include "manipulation/config.h"
#include "manipulation/dual_cone.h"
#include "manipulation/fairgrad.h"
#include "manipulation/graddrop.h"
#include "manipulation/imtl.h"
#include "manipulation/mgda.h"
#include "manipulation/nash_mtl.h"
#include "manipulation/pcd.h"
#include "manipulation/pcgrad.h"

// The weighting methods: one team maps the K×K Gram matrix to K weights.
#define SELGROUP_WEIGHTING_OPS(X)                         \
  X(pcgrad_weights, manipulation::PCGradWeights)          \
  X(mgda_weights, manipulation::MGDAWeights)              \
  X(cagrad_weights, manipulation::CAGradWeights)          \
  X(imtl_weights, manipulation::IMTLWeights)              \
  X(aligned_mtl_weights, manipulation::AlignedMTLWeights) \
  X(nash_mtl_weights, manipulation::NashMTLWeights)       \
  X(fairgrad_weights, manipulation::FairGradWeights)      \
  X(config_weights, manipulation::ConFIGWeights)          \
  X(pcd_weights, manipulation::PCDWeights)

// Ops run by one team (one block on CUDA).
#define SELGROUP_TEAM_OPS(X)                                 \
  SELGROUP_WEIGHTING_OPS(X)                                  \
  X(dual_cone_projection, manipulation::DualConeProjection) \
  X(affinity_propagation, AffinityPropagation)

// Ops that are maps over independent indices (a grid on CUDA).
#define SELGROUP_MAP_OPS(X)                 \
  X(affinity_update_, AffinityUpdate)       \
  X(group_similarity, GroupSimilarity)      \
  X(graddrop, manipulation::GradDrop)

#define SELGROUP_OPS(X) SELGROUP_TEAM_OPS(X) SELGROUP_MAP_OPS(X)
