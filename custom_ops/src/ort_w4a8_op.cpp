// ONNX Runtime glue for fptq::W4A8MatMul on the CPU execution provider:
// attribute parsing, input validation (clear error statuses, never a crash),
// the scale/zero-point cache for constant initializers, and RegisterCustomOps.
// All arithmetic lives in w4a8_cpu.* (ORT-independent).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "fptq/w4a8_contract.h"
#include "w4a8_cpu.h"
#if defined(FPTQ_HAVE_CUDA)
#include "w4a8_cuda_op.h"  // the CUDAExecutionProvider entry of the same op
#endif

#define FPTQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace fptq {
namespace {

[[noreturn]] void Fail(const std::string& msg) { throw Ort::Exception(std::string(msg), ORT_INVALID_ARGUMENT); }

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "other";
  }
}

constexpr const char* kInputNames[kNumInputs] = {"A", "B", "scales", "zero_points", "act_scale", "bias"};

// Checks that `v` is a tensor of `type`, returns its shape.
std::vector<int64_t> CheckTensor(const Ort::ConstValue& v, int index, ONNXTensorElementDataType type) {
  if (!v.IsTensor()) Fail(std::string("W4A8MatMul: input '") + kInputNames[index] + "' must be a tensor");
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type) {
    Fail(std::string("W4A8MatMul: input '") + kInputNames[index] + "' must be " + TypeName(type) + ", got " +
         TypeName(info.GetElementType()));
  }
  return info.GetShape();
}

void CheckShape(const std::vector<int64_t>& got, const std::vector<int64_t>& want, int index, const char* why) {
  if (got != want) {
    Fail(std::string("W4A8MatMul: input '") + kInputNames[index] + "' has shape " + ShapeStr(got) + ", expected " +
         ShapeStr(want) + " " + why);
  }
}

class W4A8Kernel {
 public:
  W4A8Kernel(const OrtApi& /*api*/, const OrtKernelInfo* raw_info) {
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
    isa_ = cpu::SelectIsa();

    // Scales / zero points that are constant initializers are re-laid out once, here.
    const size_t n_in = info.GetInputCount();
    auto present = [&](int i) { return static_cast<size_t>(i) < n_in && !info.GetInputName(i).empty(); };
    int scales_const = 0, zp_const = 0;
    Ort::ConstValue scales{nullptr}, zp{nullptr};
    if (present(kInScales)) scales = info.GetTensorConstantInput(kInScales, &scales_const);
    const bool has_zp = present(kInZeroPoints);
    if (has_zp) zp = info.GetTensorConstantInput(kInZeroPoints, &zp_const);
    if (scales_const && (!has_zp || zp_const)) {
      const_qp_.reset(new cpu::PackedQParams);
      Pack(scales, has_zp ? &zp : nullptr, const_qp_.get());
    }
    // Likewise the weights, for the SIMD kernels' panel layout.
    int b_const = 0;
    Ort::ConstValue b{nullptr};
    if (present(kInB) && cpu::detail::NeedsPackedWeights(isa_)) b = info.GetTensorConstantInput(kInB, &b_const);
    if (b_const) {
      CheckB(b);
      const_b_.reset(new std::vector<uint8_t>);
      cpu::PackWeightsPanels(isa_, attrs_, b.GetTensorData<uint8_t>(), const_b_.get());
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("W4A8MatMul: ") + e.what()).c_str());
    }
  }

 private:
  void Pack(const Ort::ConstValue& scales, const Ort::ConstValue* zp, cpu::PackedQParams* out) const {
    const std::vector<int64_t> want{attrs_.N, attrs_.n_groups()};
    CheckShape(CheckTensor(scales, kInScales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT), want, kInScales,
               "([N, ceil(K/group_size)])");
    const uint8_t* zp_data = nullptr;
    if (zp != nullptr) {
      CheckShape(CheckTensor(*zp, kInZeroPoints, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8), want, kInZeroPoints,
                 "([N, ceil(K/group_size)])");
      zp_data = zp->GetTensorData<uint8_t>();
    }
    std::string err = ValidateScales(scales.GetTensorData<float>(), attrs_.N, attrs_.n_groups());
    if (err.empty()) err = cpu::PackQParams(isa_, attrs_, scales.GetTensorData<float>(), zp_data, out);
    if (!err.empty()) Fail(err);
  }

  void CheckB(const Ort::ConstValue& b) const {
    CheckShape(CheckTensor(b, kInB, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
               {attrs_.N, attrs_.n_groups(), attrs_.bytes_per_group()}, kInB,
               "([N, ceil(K/group_size), group_size/2])");
  }

  static void OrtParallelFor(void* runner, void (*fn)(void*, size_t), size_t total, void* data) {
    OrtStatus* st = Ort::GetApi().KernelContext_ParallelFor(static_cast<OrtKernelContext*>(runner), fn, total, 0, data);
    if (st != nullptr) {  // no thread pool support here: run serially (tasks are idempotent)
      Ort::GetApi().ReleaseStatus(st);
      for (size_t i = 0; i < total; ++i) fn(data, i);
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_in = ctx.GetInputCount();
    auto input = [&](int i) { return static_cast<size_t>(i) < n_in ? ctx.GetInput(i) : Ort::ConstValue{nullptr}; };
    const int64_t K = attrs_.K, N = attrs_.N;

    Ort::ConstValue a = input(kInA);
    if (a == nullptr) Fail("W4A8MatMul: input 'A' is missing");
    std::vector<int64_t> a_shape = CheckTensor(a, kInA, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (a_shape.empty() || a_shape.back() != K) {
      Fail("W4A8MatMul: input 'A' has shape " + ShapeStr(a_shape) + ", its last dimension must equal K=" +
           std::to_string(K));
    }
    int64_t M = 1;
    for (size_t i = 0; i + 1 < a_shape.size(); ++i) M *= a_shape[i];

    Ort::ConstValue b = input(kInB);
    if (b == nullptr) Fail("W4A8MatMul: input 'B' is missing");
    CheckB(b);

    Ort::ConstValue scales = input(kInScales), zp = input(kInZeroPoints);
    if (scales == nullptr) Fail("W4A8MatMul: input 'scales' is missing");
    cpu::PackedQParams local_qp;
    const cpu::PackedQParams* qp = const_qp_.get();
    if (qp == nullptr) {  // not constant initializers: re-lay out every call
      Pack(scales, zp != nullptr ? &zp : nullptr, &local_qp);
      qp = &local_qp;
    }

    float act_scale = 1.0f;
    Ort::ConstValue s = input(kInActScale);
    if (attrs_.act_mode == ActMode::kStatic) {
      if (s == nullptr) Fail("W4A8MatMul: input 'act_scale' is required when act_mode is 'static'");
      std::vector<int64_t> s_shape = CheckTensor(s, kInActScale, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (s_shape.size() > 1 || (s_shape.size() == 1 && s_shape[0] != 1)) {
        Fail("W4A8MatMul: input 'act_scale' must be a scalar (shape [] or [1]), got " + ShapeStr(s_shape));
      }
      act_scale = *s.GetTensorData<float>();
      if (!(act_scale > 0.0f) || !std::isfinite(act_scale)) {
        Fail("W4A8MatMul: input 'act_scale' must be finite and > 0, got " + std::to_string(act_scale));
      }
    }

    const float* bias = nullptr;
    Ort::ConstValue bv = input(kInBias);
    if (bv != nullptr) {
      CheckShape(CheckTensor(bv, kInBias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT), {N}, kInBias, "([N])");
      bias = bv.GetTensorData<float>();
    }

    std::vector<int64_t> y_shape = a_shape;
    y_shape.back() = N;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (M == 0) return;

    cpu::W4A8Problem pb;
    pb.attrs = attrs_;
    pb.M = M;
    pb.A = a.GetTensorData<float>();
    pb.B = b.GetTensorData<uint8_t>();
    pb.B_packed = const_b_ ? const_b_->data() : nullptr;
    pb.qp = qp;
    pb.act_scale = act_scale;
    pb.bias = bias;
    pb.Y = y.GetTensorMutableData<float>();
    cpu::Parallel par;
    par.run = &W4A8Kernel::OrtParallelFor;
    par.runner = context;
    cpu::W4A8Compute(isa_, pb, par);
  }

  W4A8Attrs attrs_;
  cpu::Isa isa_ = cpu::Isa::kScalar;
  std::unique_ptr<cpu::PackedQParams> const_qp_;  // scales / zero points, if constant initializers
  std::unique_ptr<std::vector<uint8_t>> const_b_;  // PackWeightsPanels(B), if B is a constant initializer
};

struct W4A8Op : Ort::CustomOpBase<W4A8Op, W4A8Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new W4A8Kernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string("W4A8MatMul: ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return kW4A8OpType; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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
}  // namespace fptq

FPTQ_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    std::string msg = "libfptq_ops was built against ONNX Runtime API version " + std::to_string(ORT_API_VERSION) +
                      ", which this onnxruntime (" + api_base->GetVersionString() + ") does not provide";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  try {
    static fptq::W4A8Op op;
    // Deliberately never freed: it must outlive every session that uses it.
    static Ort::CustomOpDomain* domain = [] {
      auto* d = new Ort::CustomOpDomain(fptq::kDomain);
      d->Add(&op);
#if defined(FPTQ_HAVE_CUDA)
      d->Add(fptq::W4A8CudaCustomOp());
#endif
      return d;
    }();
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// Diagnostics for tests and benchmarks (ctypes).
FPTQ_EXPORT const char* fptq_ops_selected_isa() { return fptq::cpu::IsaName(fptq::cpu::SelectIsa()); }
FPTQ_EXPORT const char* fptq_ops_kernel_path(int64_t M) { return fptq::cpu::KernelPath(fptq::cpu::SelectIsa(), M); }

FPTQ_EXPORT int fptq_ops_isa_supported(const char* name) {
  using fptq::cpu::Isa;
  for (Isa isa : fptq::cpu::kAllIsas) {
    if (name != nullptr && std::string(name) == fptq::cpu::IsaName(isa)) return fptq::cpu::IsaSupported(isa) ? 1 : 0;
  }
  return 0;
}
