// The CUDA bench's kernel tables (bench/cuda_bench.cc, --attention=1 and its single-kernel modes): each
// kernel family timed side by side on the config's shapes through model/cuda's testing entry points, one
// Markdown row per case printed and appended to `rows`.
#ifndef V4SERVE_BENCH_CUDA_KERNEL_TABLES_H_
#define V4SERVE_BENCH_CUDA_KERNEL_TABLES_H_

#include <string>
#include <vector>

#include "model/config.h"

namespace v4serve::bench {

// The two attention kernels on the same random cases (cuda::testing::SparseAttention), at the config's head
// shapes: mean device time of 20 launches each, QK + PV FLOP/s of the tensor-core one against `bf16_gemm`.
void AttentionKernels(const model::ModelConfig& c, double bf16_gemm, std::vector<std::string>* rows);

// The decode path's MXFP4 expert kernels side by side (cuda::testing::ExpertGemmFp4) on V4-Flash's w1
// shape (in = hidden, out = expert inter) for the rows a decode batch gives: 16 experts stand for the 256
// (host time), each batch's slots (batch x top-k) scaled by 16/256 and spread at random.
void ExpertKernels(const model::ModelConfig& c, double fp8_gemm, std::vector<std::string>* rows);

// The dense GEMM in both low-precision formats side by side (cuda::testing::Linear): cuBLAS with BF16 weights
// and inputs, and the FP8 kernels (fp8_gemm.cuh: inputs quantized per 128, weights in 128 x 128 tiles) on
// V4-Flash's FP8 linears (wq_b, wo_b, shared w1) at decode and prefill row counts. Decode sizes report weight
// bytes per second (against `copy_bw`), prefill sizes FLOP/s (against cuBLASLt's best FP8 GEMM `fp8_gemm`).
// Each timed call reads its weights from HBM, as in a step (cuda::testing::Linear flushes the L2 before
// each); until session 15 the calls ran back to back and matrices of a few MB were read from L2.
// `only` ("NAME:ROWS", --linear=): that FP8 shape at that row count alone, 3 calls a kernel (for ncu), no
// FP32 table.
void LinearKernels(const model::ModelConfig& c, double copy_bw, double fp8_gemm,
                   std::vector<std::string>* rows, const std::string& only = "");

}  // namespace v4serve::bench

#endif  // V4SERVE_BENCH_CUDA_KERNEL_TABLES_H_
