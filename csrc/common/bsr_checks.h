// Argument checks shared by the CPU and CUDA entry points of spamkern::bsr_linear.
// (Host-side, uses ATen: never included by the torch-free CUDA kernel sources.)
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace spamkern {

inline void check_bsr_args(const at::Tensor& x, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, const at::Tensor& blocks,
                           const at::Tensor& row_order, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, "bsr_linear: x must be 2-D (rows, in_features), got ", x.sizes());
  TORCH_CHECK(blocks.dim() == 3, "bsr_linear: blocks must be (nnzb, bk, bn), got ",
              blocks.sizes());
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt &&
                  row_order.scalar_type() == at::kInt,
              "bsr_linear: row_ptr, col_idx and row_order must be int32");
  const int64_t bk = blocks.size(1), bn = blocks.size(2);
  TORCH_CHECK(bk % 16 == 0 && bn % 16 == 0 && bk >= 16 && bn >= 16 && bk <= 128 && bn <= 128,
              "bsr_linear: block sides must be multiples of 16 in [16, 128], got (bn, bk) = (",
              bn, ", ", bk, ")");
  const int64_t n_block_rows = row_ptr.numel() - 1;
  TORCH_CHECK(n_block_rows == (out_features + bn - 1) / bn,
              "bsr_linear: row_ptr has ", row_ptr.numel(), " entries, expected ",
              (out_features + bn - 1) / bn + 1, " for out_features=", out_features,
              " and bn=", bn);
  TORCH_CHECK(row_order.numel() == n_block_rows, "bsr_linear: row_order must have ",
              n_block_rows, " entries, got ", row_order.numel());
  TORCH_CHECK(col_idx.numel() == blocks.size(0), "bsr_linear: col_idx has ", col_idx.numel(),
              " entries but blocks holds ", blocks.size(0));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == out_features,
                "bsr_linear: bias must be (", out_features, ",), got ", bias->sizes());
  }
  const auto dev = x.device();
  TORCH_CHECK(row_ptr.device() == dev && col_idx.device() == dev && blocks.device() == dev &&
                  row_order.device() == dev && (!bias.has_value() || bias->device() == dev),
              "bsr_linear: all tensors must be on x's device ", dev);
}

}  // namespace spamkern
