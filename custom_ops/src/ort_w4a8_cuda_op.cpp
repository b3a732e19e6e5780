// ONNX Runtime glue for fptq::W4A8MatMul on the CUDA execution provider.
// All inputs live in device memory (ORT's default for a CUDA-EP kernel); the
// kernel reads act_scale on the device, so Compute never synchronises with the
// host.  Constant-initializer weights/scales/zero points are re-laid out once,
// at kernel creation, into device buffers from the EP's allocator; per-call
// scratch (quantized activations, row scales, group sums) comes from ORT's
// allocator for the tensor's device and is returned at the end of Compute
// (stream-ordered reuse: every kernel of the session runs on the same stream).
// Device code lives in w4a8_cuda.cu; this file does not include CUDA headers.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "fptq/w4a8_contract.h"
#include "w4a8_cuda.h"
#include "w4a8_cuda_op.h"

#define FPTQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace fptq {
namespace {

[[noreturn]] void Fail(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  throw Ort::Exception(std::string(msg), code);
}
void Check(const std::string& err) {
  if (!err.empty()) Fail(err, ORT_EP_FAIL);
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

constexpr const char* kInputNames[kNumInputs] = {"A", "B", "scales", "zero_points", "act_scale", "bias"};

std::vector<int64_t> CheckTensor(const Ort::ConstValue& v, int index, ONNXTensorElementDataType type,
                                 const char* type_name) {
  if (!v.IsTensor()) Fail(std::string("W4A8MatMul: input '") + kInputNames[index] + "' must be a tensor");
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type)
    Fail(std::string("W4A8MatMul: input '") + kInputNames[index] + "' must be " + type_name);
  return info.GetShape();
}

void CheckShape(const std::vector<int64_t>& got, const std::vector<int64_t>& want, int index, const char* why) {
  if (got != want) {
    Fail(std::string("W4A8MatMul: input '") + kInputNames[index] + "' has shape " + ShapeStr(got) + ", expected " +
         ShapeStr(want) + " " + why);
  }
}

constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

// Device memory from an OrtAllocator, freed on scope exit.
struct DeviceBuffer {
  OrtAllocator* alloc = nullptr;
  void* p = nullptr;
  DeviceBuffer() = default;
  DeviceBuffer(OrtAllocator* a, size_t bytes) : alloc(a) {
    if (bytes > 0) {
      p = a->Alloc(a, bytes);
      if (p == nullptr) Fail("W4A8MatMul (CUDA): device allocation failed", ORT_EP_FAIL);
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (p != nullptr) alloc->Free(alloc, p);
  }
};

struct AllocatorHandle {
  OrtAllocator* a = nullptr;
  ~AllocatorHandle() {
    if (a != nullptr) Ort::GetApi().ReleaseAllocator(a);
  }
};

class W4A8CudaKernel {
 public:
  W4A8CudaKernel(const OrtApi& api, const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    auto int_attr = [&](const char* name) -> int64_t {
      try {
        return info.GetAttribute<int64_t>(name);
      } catch (const Ort::Exception&) {
        Fail(std::string("W4A8MatMul: missing or non-integer attribute '") + name + "'");
      }
    };
    std::string act_mode;
    try {
      act_mode = info.GetAttribute<std::string>("act_mode");
    } catch (const Ort::Exception&) {
      Fail("W4A8MatMul: missing or non-string attribute 'act_mode' (expected 'static' or 'per_token')");
    }
    std::string err = ValidateW4A8Attrs(int_attr("K"), int_attr("N"), int_attr("group_size"), act_mode, &attrs_);
    if (!err.empty()) Fail(err);
    err = gpu::Supported(attrs_);
    if (!err.empty()) Fail(err, ORT_NOT_IMPLEMENTED);
    d_ = gpu::MakeDims(attrs_);

    const size_t n_in = info.GetInputCount();
    auto present = [&](int i) { return static_cast<size_t>(i) < n_in && !info.GetInputName(i).empty(); };
    has_zp_ = present(kInZeroPoints);
    int b_c = 0, s_c = 0, z_c = 0;
    Ort::ConstValue b{nullptr}, s{nullptr}, z{nullptr};
    if (present(kInB)) b = info.GetTensorConstantInput(kInB, &b_c);
    if (present(kInScales)) s = info.GetTensorConstantInput(kInScales, &s_c);
    if (has_zp_) z = info.GetTensorConstantInput(kInZeroPoints, &z_c);
    if (!(b_c && s_c && (!has_zp_ || z_c))) return;  // packed per call

    CheckShape(CheckTensor(b, kInB, kU8, "uint8"), {attrs_.N, attrs_.n_groups(), attrs_.bytes_per_group()}, kInB,
               "([N, ceil(K/group_size), group_size/2])");
    const std::vector<int64_t> qshape{attrs_.N, attrs_.n_groups()};
    CheckShape(CheckTensor(s, kInScales, kF32, "float32"), qshape, kInScales, "([N, ceil(K/group_size)])");
    if (has_zp_) CheckShape(CheckTensor(z, kInZeroPoints, kU8, "uint8"), qshape, kInZeroPoints, "([N, ceil(K/group_size)])");

    Ort::ThrowOnError(api.KernelInfoGetAllocator(raw_info, OrtMemTypeDefault, &alloc_));
    Bp_.reset(new DeviceBuffer(alloc_, gpu::PackedWeightBytes(d_)));
    sc_.reset(new DeviceBuffer(alloc_, gpu::PackedScaleBytes(d_)));
    if (has_zp_) zc_.reset(new DeviceBuffer(alloc_, gpu::PackedZpBytes(d_)));
    // The initializers may be in host or device memory: stage them in device
    // memory (cudaMemcpyDefault handles either), pack, wait (creation time only).
    const size_t nb = static_cast<size_t>(attrs_.N) * attrs_.n_groups() * attrs_.bytes_per_group();
    const size_t nq = static_cast<size_t>(attrs_.N) * attrs_.n_groups();
    DeviceBuffer tb(alloc_, nb), ts(alloc_, nq * sizeof(float)), tz(alloc_, has_zp_ ? nq : 0);
    Check(gpu::CopyAsync(tb.p, b.GetTensorData<uint8_t>(), nb, nullptr));
    Check(gpu::CopyAsync(ts.p, s.GetTensorData<float>(), nq * sizeof(float), nullptr));
    if (has_zp_) Check(gpu::CopyAsync(tz.p, z.GetTensorData<uint8_t>(), nq, nullptr));
    Check(gpu::PackWeights(d_, static_cast<const uint8_t*>(tb.p), static_cast<const float*>(ts.p),
                           static_cast<const uint8_t*>(tz.p), static_cast<uint8_t*>(Bp_->p),
                           static_cast<float*>(sc_->p), zc_ ? static_cast<int8_t*>(zc_->p) : nullptr, nullptr));
    Check(gpu::Synchronize(nullptr));
  }

  ~W4A8CudaKernel() {
    Bp_.reset();
    sc_.reset();
    zc_.reset();
    if (alloc_ != nullptr) Ort::GetApi().ReleaseAllocator(alloc_);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("W4A8MatMul (CUDA): ") + e.what()).c_str());
    }
  }

 private:
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_in = ctx.GetInputCount();
    auto input = [&](int i) { return static_cast<size_t>(i) < n_in ? ctx.GetInput(i) : Ort::ConstValue{nullptr}; };
    const int64_t K = attrs_.K, N = attrs_.N;

    Ort::ConstValue a = input(kInA);
    if (a == nullptr) Fail("W4A8MatMul: input 'A' is missing");
    std::vector<int64_t> a_shape = CheckTensor(a, kInA, kF32, "float32");
    if (a_shape.empty() || a_shape.back() != K) {
      Fail("W4A8MatMul: input 'A' has shape " + ShapeStr(a_shape) + ", its last dimension must equal K=" +
           std::to_string(K));
    }
    int64_t M = 1;
    for (size_t i = 0; i + 1 < a_shape.size(); ++i) M *= a_shape[i];

    Ort::ConstValue b = input(kInB), s = input(kInScales), z = input(kInZeroPoints);
    if (b == nullptr) Fail("W4A8MatMul: input 'B' is missing");
    if (s == nullptr) Fail("W4A8MatMul: input 'scales' is missing");
    const bool packed = Bp_ != nullptr;
    if (!packed) {
      CheckShape(CheckTensor(b, kInB, kU8, "uint8"), {N, attrs_.n_groups(), attrs_.bytes_per_group()}, kInB,
                 "([N, ceil(K/group_size), group_size/2])");
      CheckShape(CheckTensor(s, kInScales, kF32, "float32"), {N, attrs_.n_groups()}, kInScales,
                 "([N, ceil(K/group_size)])");
      if (z != nullptr)
        CheckShape(CheckTensor(z, kInZeroPoints, kU8, "uint8"), {N, attrs_.n_groups()}, kInZeroPoints,
                   "([N, ceil(K/group_size)])");
    }
    const bool has_zp = packed ? has_zp_ : (z != nullptr);

    const float* act_scale = nullptr;
    Ort::ConstValue as = input(kInActScale);
    if (attrs_.act_mode == ActMode::kStatic) {
      if (as == nullptr) Fail("W4A8MatMul: input 'act_scale' is required when act_mode is 'static'");
      std::vector<int64_t> s_shape = CheckTensor(as, kInActScale, kF32, "float32");
      if (s_shape.size() > 1 || (s_shape.size() == 1 && s_shape[0] != 1))
        Fail("W4A8MatMul: input 'act_scale' must be a scalar (shape [] or [1]), got " + ShapeStr(s_shape));
      act_scale = as.GetTensorData<float>();  // read on the device (no host sync)
    }
    const float* bias = nullptr;
    Ort::ConstValue bv = input(kInBias);
    if (bv != nullptr) {
      CheckShape(CheckTensor(bv, kInBias, kF32, "float32"), {N}, kInBias, "([N])");
      bias = bv.GetTensorData<float>();
    }

    std::vector<int64_t> y_shape = a_shape;
    y_shape.back() = N;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (M == 0) return;

    void* stream = ctx.GetGPUComputeStream();
    AllocatorHandle ah;
    Ort::ConstMemoryInfo a_mem = a.GetTensorMemoryInfo();
    ah.a = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(a_mem));
    if (ah.a == nullptr) Fail("W4A8MatMul (CUDA): no allocator for the input's device", ORT_EP_FAIL);

    gpu::Packed w;
    std::unique_ptr<DeviceBuffer> tBp, tsc, tzc;
    if (packed) {
      w.Bp = static_cast<const uint8_t*>(Bp_->p);
      w.sc16 = static_cast<const float*>(sc_->p);
      w.zc = zc_ ? static_cast<const int8_t*>(zc_->p) : nullptr;
    } else {  // weights are graph inputs: re-lay out on the stream, every call
      tBp.reset(new DeviceBuffer(ah.a, gpu::PackedWeightBytes(d_)));
      tsc.reset(new DeviceBuffer(ah.a, gpu::PackedScaleBytes(d_)));
      if (has_zp) tzc.reset(new DeviceBuffer(ah.a, gpu::PackedZpBytes(d_)));
      Check(gpu::PackWeights(d_, b.GetTensorData<uint8_t>(), s.GetTensorData<float>(),
                             has_zp ? z.GetTensorData<uint8_t>() : nullptr, static_cast<uint8_t*>(tBp->p),
                             static_cast<float*>(tsc->p), tzc ? static_cast<int8_t*>(tzc->p) : nullptr, stream));
      w.Bp = static_cast<const uint8_t*>(tBp->p);
      w.sc16 = static_cast<const float*>(tsc->p);
      w.zc = tzc ? static_cast<const int8_t*>(tzc->p) : nullptr;
    }
    DeviceBuffer ws(ah.a, gpu::WorkspaceBytes(d_, M, has_zp));

    gpu::Problem p;
    p.d = d_;
    p.M = M;
    p.per_token = attrs_.act_mode == ActMode::kPerToken;
    p.A = a.GetTensorData<float>();
    p.act_scale = act_scale;
    p.bias = bias;
    p.w = w;
    p.Y = y.GetTensorMutableData<float>();
    p.workspace = ws.p;
    p.force_path = force_path_;
    Check(gpu::Run(p, stream));
  }

  W4A8Attrs attrs_;
  gpu::Dims d_;
  bool has_zp_ = false;
  OrtAllocator* alloc_ = nullptr;
  std::unique_ptr<DeviceBuffer> Bp_, sc_, zc_;  // packed constant weights (device)
  int force_path_ = [] {
    // tests: decode / decode_v4 / prefill128 / prefill64 / prefill_wgmma
    const char* e = std::getenv("FPTQ_OPS_CUDA_PATH");
    if (e == nullptr) return 0;
    if (std::strcmp(e, "decode") == 0) return 1;
    if (std::strcmp(e, "prefill") == 0 || std::strcmp(e, "prefill128") == 0) return 2;
    if (std::strcmp(e, "prefill64") == 0) return 4;
    if (std::strcmp(e, "decode_v4") == 0) return 5;
    if (std::strcmp(e, "prefill_wgmma") == 0) return 7;
    return 0;
  }();
};

struct W4A8CudaOp : Ort::CustomOpBase<W4A8CudaOp, W4A8CudaKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new W4A8CudaKernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string("W4A8MatMul (CUDA): ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return kW4A8OpType; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == kInB || i == kInZeroPoints) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= kInZeroPoints ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                              : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* W4A8CudaCustomOp() {
  static W4A8CudaOp op;
  return &op;
}

}  // namespace fptq

// ---- Direct entry points for the GPU benchmark/tests (ctypes, device pointers) ----
// Each returns nullptr on success, else an error message (valid until the next call).
namespace {
thread_local std::string g_err;
const char* Ret(const std::string& e) {
  g_err = e;
  return g_err.empty() ? nullptr : g_err.c_str();
}
fptq::gpu::Dims DimsOf(int64_t K, int64_t N, int64_t G) {
  fptq::W4A8Attrs a;
  a.K = K;
  a.N = N;
  a.group_size = G;
  return fptq::gpu::MakeDims(a);
}
}  // namespace

FPTQ_EXPORT int fptq_cuda_compiled() { return 1; }

// which: 0 packed weights, 1 packed scales, 2 packed zero points
FPTQ_EXPORT size_t fptq_cuda_packed_bytes(int64_t K, int64_t N, int64_t G, int which) {
  const fptq::gpu::Dims d = DimsOf(K, N, G);
  return which == 0 ? fptq::gpu::PackedWeightBytes(d)
                    : which == 1 ? fptq::gpu::PackedScaleBytes(d) : fptq::gpu::PackedZpBytes(d);
}

FPTQ_EXPORT size_t fptq_cuda_workspace_bytes(int64_t K, int64_t N, int64_t G, int64_t M, int has_zp) {
  return fptq::gpu::WorkspaceBytes(DimsOf(K, N, G), M, has_zp != 0);
}

// The kernel force_path 0 picks for M rows on the current device, as a force_path value (bench labels).
FPTQ_EXPORT int fptq_cuda_auto_path(int64_t K, int64_t N, int64_t G, int64_t M) {
  return fptq::gpu::AutoPath(DimsOf(K, N, G), M);
}

FPTQ_EXPORT const char* fptq_cuda_pack(int64_t K, int64_t N, int64_t G, const uint8_t* B, const float* scales,
                                       const uint8_t* zp, uint8_t* Bp, float* sc16, int8_t* zc, void* stream) {
  return Ret(fptq::gpu::PackWeights(DimsOf(K, N, G), B, scales, zp, Bp, sc16, zc, stream));
}

FPTQ_EXPORT const char* fptq_cuda_run(int64_t K, int64_t N, int64_t G, int per_token, int64_t M, const float* A,
                                      const float* act_scale, const float* bias, const uint8_t* Bp, const float* sc16,
                                      const int8_t* zc, float* Y, void* workspace, void* stream, int force_path,
                                      int force_splits) {
  fptq::gpu::Problem p;
  p.d = DimsOf(K, N, G);
  p.M = M;
  p.per_token = per_token != 0;
  p.A = A;
  p.act_scale = act_scale;
  p.bias = bias;
  p.w.Bp = Bp;
  p.w.sc16 = sc16;
  p.w.zc = zc;
  p.Y = Y;
  p.workspace = workspace;
  p.force_path = force_path;
  p.force_splits = force_splits;
  return Ret(fptq::gpu::Run(p, stream));
}
