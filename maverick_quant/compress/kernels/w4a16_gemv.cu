// W4A16 GEMV for batch-1 decode (and a few rows), on maverick-quant's runtime layout:
//   packed uint8 [E?, N, K/2] (code 2j in the low nibble of byte j), scales fp16 [E?, N, G],
//   zeros uint8 [E?, N, G] or none (symmetric: zero 8), W[n,k] = (q - z) * s.
//
// One warp per output row n (per row m of x). Each lane reads 16 bytes = 32 codes at a time
// (one uint4 load, 512 contiguous bytes per warp), always inside one group because group
// sizes are multiples of 32; per chunk it adds s * (sum q*x - z * sum x) in fp32, so the zero
// costs one multiply per 32 codes. Warp shuffle reduction; lane 0 writes y[m, n].
// Optional per-row expert index (stacked weights), source token (x row) and score (the
// router's sigmoid score, applied to the result: equal to scaling the input by linearity):
// with them the same kernel is the top-1 MoE decode path.
// Only torch's core headers are used (the caller passes the current CUDA stream as an
// integer), so the file compiles against a CPU build of torch: CI checks it with nvcc alone.
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <optional>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kCodesPerLane = 32;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// 32 activations of type T starting at x (64 bytes, 16-byte aligned) -> fp32 in xs.
template <typename T>
__device__ __forceinline__ void load_activations(const T* __restrict__ x, float* xs) {
  const uint4* src = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    uint4 word = __ldg(src + v);
    const T* values = reinterpret_cast<const T*>(&word);
#pragma unroll
    for (int i = 0; i < 8; ++i) xs[v * 8 + i] = to_float(values[i]);
  }
}

template <typename T, bool kHasZeros>
__global__ void w4a16_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                  const __half* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                  const int32_t* __restrict__ row_expert, const int32_t* __restrict__ row_token,
                                  const float* __restrict__ row_scale, T* __restrict__ out,
                                  int n_out, int k_in, int group_size, int groups) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int m = blockIdx.y;
  if (n >= n_out) return;
  const int64_t expert = row_expert ? row_expert[m] : 0;
  const int64_t token = row_token ? row_token[m] : m;
  const int64_t row = expert * n_out + n;
  const uint8_t* w = packed + row * (k_in / 2);
  const __half* s = scales + row * groups;
  const T* xr = x + token * k_in;
  float acc = 0.f;
  for (int chunk = lane; chunk < k_in / kCodesPerLane; chunk += kWarp) {
    const int k0 = chunk * kCodesPerLane;
    uint4 word = __ldg(reinterpret_cast<const uint4*>(w + k0 / 2));
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&word);
    float xs[kCodesPerLane];
    load_activations(xr + k0, xs);
    float dot = 0.f, x_sum = 0.f;
#pragma unroll
    for (int j = 0; j < kCodesPerLane / 2; ++j) {
      dot += float(bytes[j] & 0xF) * xs[2 * j] + float(bytes[j] >> 4) * xs[2 * j + 1];
      x_sum += xs[2 * j] + xs[2 * j + 1];
    }
    const int g = k0 / group_size;
    const float zero = kHasZeros ? float(zeros[row * groups + g]) : 8.f;
    acc += __half2float(s[g]) * (dot - zero * x_sum);
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffff, acc, offset);
  if (lane == 0) {
    if (row_scale) acc *= row_scale[m];
    store(out + int64_t(m) * n_out + n, acc);
  }
}

template <typename T, typename TorchT>
void launch(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
            const std::optional<at::Tensor>& zeros, const int32_t* row_expert, const int32_t* row_token,
            const float* row_scale, at::Tensor& out, int rows, int n_out, int k_in, int group_size, int groups,
            cudaStream_t stream) {
  dim3 grid((n_out + kWarpsPerBlock - 1) / kWarpsPerBlock, rows);
  dim3 block(kWarp * kWarpsPerBlock);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr<TorchT>());
  T* op = reinterpret_cast<T*>(out.data_ptr<TorchT>());
  const __half* sp = reinterpret_cast<const __half*>(scales.data_ptr<at::Half>());
  if (zeros.has_value()) {
    w4a16_gemv_kernel<T, true><<<grid, block, 0, stream>>>(xp, packed.data_ptr<uint8_t>(), sp,
        zeros->data_ptr<uint8_t>(), row_expert, row_token, row_scale, op, n_out, k_in, group_size, groups);
  } else {
    w4a16_gemv_kernel<T, false><<<grid, block, 0, stream>>>(xp, packed.data_ptr<uint8_t>(), sp, nullptr,
        row_expert, row_token, row_scale, op, n_out, k_in, group_size, groups);
  }
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, "w4a16_gemv launch failed: ", cudaGetErrorString(status));
}

template <typename Scalar>
const Scalar* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<Scalar>() : nullptr;
}

}  // namespace

// y [rows, N] in x's dtype: y[m] = (x[row_token[m]] W_{row_expert[m]}^T) * row_scale[m];
// `stream` is torch.cuda.current_stream().cuda_stream.
at::Tensor w4a16_gemv(at::Tensor x, at::Tensor packed, at::Tensor scales, std::optional<at::Tensor> zeros,
                         std::optional<at::Tensor> row_expert, std::optional<at::Tensor> row_token,
                         std::optional<at::Tensor> row_scale, int64_t rows, int64_t group_size,
                         int64_t stream) {
  TORCH_CHECK(x.is_cuda() && packed.is_cuda() && scales.is_cuda(), "w4a16_gemv: tensors must be on a CUDA device");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && scales.is_contiguous(), "w4a16_gemv: tensors must be contiguous");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf, "w4a16_gemv: packed uint8, scales fp16");
  TORCH_CHECK(group_size % kCodesPerLane == 0, "w4a16_gemv: group size must be a multiple of 32, got ", group_size);
  const int n_out = packed.size(-2), k_in = packed.size(-1) * 2, groups = scales.size(-1);
  TORCH_CHECK(x.size(-1) == k_in, "w4a16_gemv: x has ", x.size(-1), " columns, the weight ", k_in);
  auto out = at::empty({rows, n_out}, x.options());
  if (rows == 0) return out;
  const int32_t* expert_ptr = optional_ptr<int32_t>(row_expert);
  const int32_t* token_ptr = optional_ptr<int32_t>(row_token);
  const float* scale_ptr = optional_ptr<float>(row_scale);
  if (x.scalar_type() == at::kHalf) {
    launch<__half, at::Half>(x, packed, scales, zeros, expert_ptr, token_ptr, scale_ptr, out, rows, n_out, k_in,
                             group_size, groups, reinterpret_cast<cudaStream_t>(stream));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "w4a16_gemv: x must be fp16 or bf16");
    launch<__nv_bfloat16, at::BFloat16>(x, packed, scales, zeros, expert_ptr, token_ptr, scale_ptr, out, rows, n_out,
                                        k_in, group_size, groups, reinterpret_cast<cudaStream_t>(stream));
  }
  return out;
}
