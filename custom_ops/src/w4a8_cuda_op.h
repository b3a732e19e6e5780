// The CUDAExecutionProvider entry of fptq::W4A8MatMul (compiled only with CUDA).
#pragma once

struct OrtCustomOp;

namespace fptq {
// The op object for RegisterCustomOps (static lifetime).
const OrtCustomOp* W4A8CudaCustomOp();
}  // namespace fptq
