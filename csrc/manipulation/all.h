// Every gradient-manipulation algorithm of the baselines (see common.h for the
// shape they share). Included by the CPU binding, the CUDA binding and the CUDA
// kernels.
#pragma once

#include "aligned_mtl.h"
#include "cagrad.h"
#include "graddrop.h"
#include "imtl.h"
#include "mgda.h"
#include "nash_mtl.h"
#include "pcgrad.h"
