// Every op's schema, defined once, with its defaults: the schema and the Python
// wrapper (selgroup_fast/ops.py) are the only two places that state them. The
// kernels register themselves per backend (csrc/bindings.h's register_ops, from
// csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp); the fake (meta) kernels are
// registered from Python with torch.library.register_fake (selgroup_fast/ops.py).
#include <Python.h>
#include <torch/library.h>

namespace {
// Answers from the build, not from the device: true when the CUDA kernels were compiled in.
bool cuda_available() {
#ifdef SELGROUP_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

extern "C" {
// An empty Python module: importing selgroup_fast._C loads this library and with
// it the op registrations below. No pybind11, so the build stays light and the
// module works with the limited (stable) Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(selgroup_fast, m) {
  // ---- proximal inter-task affinity and grouping (docs/algorithm.md) ----
  m.def("affinity_update_(Tensor(a!) affinity, Tensor before, Tensor after, Tensor group_mask, float decay) -> ()");
  m.def("group_similarity(Tensor affinity) -> Tensor");
  m.def(
      "affinity_propagation(Tensor similarity, float? preference=None, float damping=0.5, int max_iter=200, "
      "int convergence_iter=15) -> Tensor");
  // Defined with its kernel: it takes no tensor, so there is nothing to dispatch on.
  m.def("cuda_available() -> bool", &cuda_available);
  // ---- gradient manipulation of the baselines (selgroup_fast.methods) ----
  // Weighting methods: K×K Gram matrix G = J·Jᵀ -> weights w[K], d = wᵀ·J (csrc/manipulation/*.h).
  m.def("pcgrad_weights(Tensor gram, Tensor order) -> Tensor");
  m.def("mgda_weights(Tensor gram, int max_iter=250, float tol=0.0) -> Tensor");
  m.def("cagrad_weights(Tensor gram, float c=0.4, int rescale=1, int max_iter=1000, float tol=1e-10) -> Tensor");
  m.def("imtl_weights(Tensor gram) -> Tensor");
  // scale_mode: "min", "median" or "rmse" (csrc/manipulation/aligned_mtl.h's AlignedScale).
  m.def("aligned_mtl_weights(Tensor gram, str scale_mode=\"min\") -> Tensor");
  m.def("nash_mtl_weights(Tensor gram, Tensor alpha_init, int max_iter=50, float tol=1e-16) -> Tensor");
  m.def("fairgrad_weights(Tensor gram, float alpha=1.0, int max_iter=50, float tol=1e-16) -> Tensor");
  m.def("config_weights(Tensor gram, Tensor preference) -> Tensor");
  m.def("pcd_weights(Tensor gram, Tensor scales, Tensor taus) -> Tensor");
  // UPGrad, DualProj: each row u of `rows` (N×K) -> v = argmin vᵀ·Ĝ·v s.t. v ≥ u, Ĝ = G/tr(G) + reg_eps·I
  // (csrc/manipulation/dual_cone.h); Jᵀ·v is Jᵀ·u projected onto the dual cone of J's rows.
  m.def("dual_cone_projection(Tensor gram, Tensor rows, float norm_eps=0.0001, float reg_eps=0.0001) -> Tensor");
  // GradDrop: K×P task gradients -> the update d[P], one fused pass; column_offset: the global
  // index of J's first column (the draws of a column slice, e.g. an FSDP2 shard).
  m.def("graddrop(Tensor jacobian, Tensor leak, int seed, int offset, int column_offset=0) -> Tensor");
}
