// The built-in experts (GELU, no biases) on the CPU: the sparse and the dense-masked path,
// forward and backward.
//
// Shape legend: T tokens, D d_model, E local experts, H expert width, R routes (token, expert
// pairs). Expert e computes gate * (gelu(x w_in[e]^T) w_out[e]); w_in and w_out are [E, H, D].
//
// Why compiled ops: on a few CPU threads the Python paths stream every intermediate through
// main memory. Their [R, D] or [T, E * H] buffers outgrow the caches, so their GEMMs with a
// 64-wide side ran at 75-80 % of a dense GEMM's FLOP rate (shape B of smoe_ds.bench), and
// the gathers, scatter-adds and elementwise passes around them cost as much again. Here each
// thread takes a share of the work and carries one piece of it (an expert's routes, or a
// block of tokens) from its inputs to its outputs while it is in that thread's cache, with
// single-threaded GEMMs inside the parallel region. Buffers are allocated once per thread.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

using at::Tensor;

namespace {

// Rows idx[0..n) of src [*, D] -> dst [n, D].
template <typename scalar_t>
void gather_rows(scalar_t* dst, const scalar_t* src, const int64_t* idx, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * D, src + idx[i] * D, D * sizeof(scalar_t));
}

// dst[idx[i]] += src[i] for the n rows of src [n, D].
template <typename scalar_t>
void add_rows(scalar_t* dst, const scalar_t* src, const int64_t* idx, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    scalar_t* d = dst + idx[i] * D;
    const scalar_t* s = src + i * D;
    for (int64_t j = 0; j < D; ++j) d[j] += s[j];
  }
}

void gather(Tensor& dst, const Tensor& src, const int64_t* idx, int64_t n) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows", [&] {
    gather_rows(dst.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), idx, n, src.size(1));
  });
}

void scatter_add(Tensor& dst, const Tensor& src, const int64_t* idx, int64_t n) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "add_rows", [&] {
    add_rows(dst.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), idx, n, src.size(1));
  });
}

// How many shares to split `pieces` pieces of work into: one per thread, at most one per piece.
int64_t thread_shares(int64_t pieces) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pieces));
}

// First expert of each of `parts` shares, so that every share has about R / parts routes.
std::vector<int64_t> share_starts(const int64_t* off, int64_t E, int64_t parts) {
  std::vector<int64_t> first(parts + 1, E);
  first[0] = 0;
  int64_t e = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = off[E] * p / parts;
    while (e < E && off[e + 1] <= target) ++e;
    if (e < E && target - off[e] > off[e + 1] - target) ++e;  // the straddling expert: the nearer side
    first[p] = std::max(e, first[p - 1]);
  }
  return first;
}

// Runs body(share, first expert, end expert, accumulator [T, D]) on every thread and returns the
// sum of the accumulators.
template <typename Body>
Tensor over_expert_shares(const Tensor& offsets, int64_t E, const Tensor& like_TD, const Body& body) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t parts = thread_shares(E);
  const std::vector<int64_t> first = share_starts(off, E, parts);
  std::vector<Tensor> sums(parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
    for (int64_t p = begin; p < end; ++p) {
      sums[p] = at::zeros_like(like_TD);
      body(first[p], first[p + 1], sums[p]);
    }
  });
  for (int64_t p = 1; p < parts; ++p) sums[0].add_(sums[p]);
  return sums[0];
}

int64_t most_routes(const int64_t* off, int64_t E) {
  int64_t most = 0;
  for (int64_t e = 0; e < E; ++e) most = std::max(most, off[e + 1] - off[e]);
  return most;
}

void check_weights(const Tensor& x, const Tensor& w_in, const Tensor& w_out) {
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 3 && w_in.sizes() == w_out.sizes() && w_in.size(2) == x.size(1),
              "expected x [T, D] and w_in, w_out [E, H, D]");
}

void check_sparse(const Tensor& x, const Tensor& w_in, const Tensor& w_out, const Tensor& gate_R,
                  const Tensor& token_R, const Tensor& offsets) {
  for (const Tensor* t : {&x, &w_in, &w_out, &gate_R, &token_R, &offsets}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "sparse_gelu_experts: CPU, contiguous tensors only");
  }
  TORCH_CHECK(w_in.scalar_type() == x.scalar_type() && w_out.scalar_type() == x.scalar_type() &&
                  gate_R.scalar_type() == x.scalar_type(),
              "sparse_gelu_experts: x, weights and gates must share one dtype");
  TORCH_CHECK(token_R.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong, "int64 routes");
  check_weights(x, w_in, w_out);
  const int64_t E = w_in.size(0), R = token_R.numel();
  TORCH_CHECK(offsets.numel() == E + 1 && gate_R.numel() == R, "offsets must have E + 1 entries, gate_R R");
  // The kernels index raw memory with these: out-of-range values must stop here, not corrupt it.
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == R, "offsets must run from 0 to the number of routes");
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(off[e + 1] >= off[e], "offsets must not decrease");
  if (R > 0) {
    const auto [low, high] = at::aminmax(token_R);
    TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < x.size(0), "token_R out of range");
  }
}

}  // namespace

// ---- sparse path: routes sorted by expert; rows offsets[e] .. offsets[e+1] of token_R and
// gate_R are expert e's. Each thread takes a share of the experts with about R / threads
// routes and adds into its own [T, D] output, summed at the end, so no two threads write
// the same row.

// -> (y [T, D], pre [R, H], the pre-activations kept for backward)
std::vector<Tensor> sparse_forward(const Tensor& x, const Tensor& w_in, const Tensor& w_out, const Tensor& gate_R,
                            const Tensor& token_R, const Tensor& offsets) {
  check_sparse(x, w_in, w_out, gate_R, token_R, offsets);
  const int64_t E = w_in.size(0), H = w_in.size(1), D = x.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* tok = token_R.data_ptr<int64_t>();
  const int64_t C = most_routes(off, E);
  Tensor pre = at::empty({token_R.size(0), H}, x.options());
  Tensor y = over_expert_shares(offsets, E, x, [&](int64_t e0, int64_t e1, Tensor& y_part) {
    Tensor rows_buf = at::empty({C, D}, x.options()), hidden_buf = at::empty({C, H}, x.options());
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t r0 = off[e], c = off[e + 1] - r0;
      if (c == 0) continue;
      Tensor rows = rows_buf.narrow(0, 0, c), hidden = hidden_buf.narrow(0, 0, c), pre_e = pre.narrow(0, r0, c);
      gather(rows, x, tok + r0, c);
      at::mm_out(pre_e, rows, w_in[e].t());
      at::gelu_out(hidden, pre_e);
      hidden.mul_(gate_R.narrow(0, r0, c).unsqueeze(1));
      at::mm_out(rows, hidden, w_out[e]);  // the gathered inputs are spent: reuse their buffer
      scatter_add(y_part, rows, tok + r0, c);
    }
  });
  return {y, pre};
}

// -> (grad x [T, D], grad w_in [E, H, D], grad w_out [E, H, D], grad gate_R [R])
std::vector<Tensor> sparse_backward(const Tensor& grad_y, const Tensor& x, const Tensor& w_in, const Tensor& w_out,
                             const Tensor& gate_R, const Tensor& token_R, const Tensor& offsets, const Tensor& pre) {
  check_sparse(x, w_in, w_out, gate_R, token_R, offsets);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.sizes() == x.sizes(), "grad_y must be a contiguous [T, D]");
  const int64_t E = w_in.size(0), H = w_in.size(1), D = x.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* tok = token_R.data_ptr<int64_t>();
  const int64_t C = most_routes(off, E);
  Tensor grad_w_in = at::empty_like(w_in), grad_w_out = at::empty_like(w_out), grad_gate = at::empty_like(gate_R);
  Tensor grad_x = over_expert_shares(offsets, E, x, [&](int64_t e0, int64_t e1, Tensor& grad_x_part) {
    Tensor rows_buf = at::empty({C, D}, x.options());
    Tensor act_buf = at::empty({C, H}, x.options()), grad_h_buf = at::empty({C, H}, x.options());
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t r0 = off[e], c = off[e + 1] - r0;
      Tensor grad_w_in_e = grad_w_in[e], grad_w_out_e = grad_w_out[e];
      if (c == 0) {
        grad_w_in_e.zero_();
        grad_w_out_e.zero_();
        continue;
      }
      Tensor rows = rows_buf.narrow(0, 0, c), act = act_buf.narrow(0, 0, c), grad_h = grad_h_buf.narrow(0, 0, c);
      Tensor pre_e = pre.narrow(0, r0, c), gate = gate_R.narrow(0, r0, c).unsqueeze(1);
      Tensor grad_gate_e = grad_gate.narrow(0, r0, c);
      gather(rows, grad_y, tok + r0, c);                // rows: grad of this expert's outputs [c, D]
      at::gelu_out(act, pre_e);                         // recomputed: cheaper than keeping it
      at::mm_out(grad_h, rows, w_out[e].t());           // grad of gate * act [c, H]
      at::sum_out(grad_gate_e, grad_h * act, {1});
      act.mul_(gate);                                   // act: the gated hidden units
      at::mm_out(grad_w_out_e, act.t(), rows);
      grad_h.mul_(gate);                                // grad_h: grad of act
      at::gelu_backward_out(act, grad_h, pre_e);        // act: grad of the pre-activations
      gather(rows, x, tok + r0, c);                     // rows: this expert's inputs again
      at::mm_out(grad_w_in_e, act.t(), rows);
      at::mm_out(rows, act, w_in[e]);                   // rows: grad of the inputs
      scatter_add(grad_x_part, rows, tok + r0, c);
    }
  });
  return {grad_x, grad_w_in, grad_w_out, grad_gate};
}

// ---- dense-masked path: every expert on every token, each expert's H hidden units scaled by
// its gate, as two GEMMs over the concatenated experts ([E * H, D] views of w_in and w_out).
// Each thread takes a run of `block`-token blocks; forward writes its blocks' rows of y, and
// backward sums its own weight gradients, added up at the end.

namespace {

void check_dense(const Tensor& x, const Tensor& w_in, const Tensor& w_out, const Tensor& gates) {
  for (const Tensor* t : {&x, &w_in, &w_out, &gates}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "dense_gelu_experts: CPU, contiguous tensors only");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "dense_gelu_experts: one dtype for x, weights and gates");
  }
  check_weights(x, w_in, w_out);
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == x.size(0) && gates.size(1) == w_in.size(0), "gates must be [T, E]");
}

// Runs body(first block, end block, part) over `parts` runs of blocks, one per thread.
template <typename Body>
void over_token_blocks(int64_t nblocks, int64_t parts, const Body& body) {
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
    for (int64_t p = begin; p < end; ++p) body(nblocks * p / parts, nblocks * (p + 1) / parts, p);
  });
}

}  // namespace

// -> (y [T, D], pre [T, E * H], the pre-activations kept for backward)
std::vector<Tensor> dense_forward(const Tensor& x, const Tensor& w_in, const Tensor& w_out, const Tensor& gates,
                                  int64_t block) {
  check_dense(x, w_in, w_out, gates);
  const int64_t T = x.size(0), E = w_in.size(0), H = w_in.size(1), D = x.size(1);
  const Tensor w_in_cat = w_in.view({E * H, D}), w_out_cat = w_out.view({E * H, D});
  Tensor pre = at::empty({T, E * H}, x.options()), y = at::empty({T, D}, x.options());
  const int64_t nblocks = (T + block - 1) / block;
  const int64_t parts = thread_shares(nblocks);
  over_token_blocks(nblocks, parts, [&](int64_t b0, int64_t b1, int64_t) {
    Tensor hidden_buf = at::empty({block, E * H}, x.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, n = std::min(block, T - t0);
      Tensor pre_b = pre.narrow(0, t0, n), hidden = hidden_buf.narrow(0, 0, n), y_b = y.narrow(0, t0, n);
      at::mm_out(pre_b, x.narrow(0, t0, n), w_in_cat.t());
      at::gelu_out(hidden, pre_b);
      hidden.view({n, E, H}).mul_(gates.narrow(0, t0, n).unsqueeze(2));
      at::mm_out(y_b, hidden, w_out_cat);
    }
  });
  return {y, pre};
}

// -> (grad x [T, D], grad w_in [E, H, D], grad w_out [E, H, D], grad gates [T, E])
std::vector<Tensor> dense_backward(const Tensor& grad_y, const Tensor& x, const Tensor& w_in, const Tensor& w_out,
                                   const Tensor& gates, const Tensor& pre, int64_t block) {
  check_dense(x, w_in, w_out, gates);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.sizes() == x.sizes(), "grad_y must be a contiguous [T, D]");
  const int64_t T = x.size(0), E = w_in.size(0), H = w_in.size(1), D = x.size(1);
  const Tensor w_in_cat = w_in.view({E * H, D}), w_out_cat = w_out.view({E * H, D});
  Tensor grad_x = at::empty_like(x), grad_gates = at::empty_like(gates);
  const int64_t nblocks = (T + block - 1) / block;
  const int64_t parts = thread_shares(nblocks);
  std::vector<Tensor> grad_w_in(parts), grad_w_out(parts);
  over_token_blocks(nblocks, parts, [&](int64_t b0, int64_t b1, int64_t p) {
    Tensor act_buf = at::empty({block, E * H}, x.options()), grad_h_buf = at::empty({block, E * H}, x.options());
    // Summed over blocks in fp32 whatever the dtype, so bf16 gradients round once per block's
    // partial product rather than once per running sum.
    grad_w_in[p] = at::zeros({E * H, D}, x.options().dtype(at::kFloat));
    grad_w_out[p] = at::zeros({E * H, D}, x.options().dtype(at::kFloat));
    const auto accumulate = [](Tensor& sum, const Tensor& a, const Tensor& b) {
      if (a.scalar_type() == at::kFloat) sum.addmm_(a, b);
      else sum.add_(at::mm(a, b));
    };
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, n = std::min(block, T - t0);
      Tensor pre_b = pre.narrow(0, t0, n), act = act_buf.narrow(0, 0, n), grad_h = grad_h_buf.narrow(0, 0, n);
      Tensor grad_y_b = grad_y.narrow(0, t0, n), x_b = x.narrow(0, t0, n), grad_x_b = grad_x.narrow(0, t0, n);
      Tensor gate = gates.narrow(0, t0, n).unsqueeze(2), grad_gates_b = grad_gates.narrow(0, t0, n);
      at::gelu_out(act, pre_b);                              // recomputed: cheaper than keeping it
      at::mm_out(grad_h, grad_y_b, w_out_cat.t());           // grad of gate * act [n, E * H]
      at::sum_out(grad_gates_b, (grad_h * act).view({n, E, H}), {2});
      act.view({n, E, H}).mul_(gate);                        // act: the gated hidden units
      accumulate(grad_w_out[p], act.t(), grad_y_b);
      grad_h.view({n, E, H}).mul_(gate);                     // grad_h: grad of act
      at::gelu_backward_out(act, grad_h, pre_b);             // act: grad of the pre-activations
      accumulate(grad_w_in[p], act.t(), x_b);
      at::mm_out(grad_x_b, act, w_in_cat);
    }
  });
  for (int64_t p = 1; p < parts; ++p) {
    grad_w_in[0].add_(grad_w_in[p]);
    grad_w_out[0].add_(grad_w_out[p]);
  }
  const auto as_weights = [&](const Tensor& g) { return g.view({E, H, D}).to(w_in.scalar_type()); };
  return {grad_x, as_weights(grad_w_in[0]), as_weights(grad_w_out[0]), grad_gates};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_forward", &sparse_forward, "GELU experts on their routes, forward");
  m.def("sparse_backward", &sparse_backward, "GELU experts on their routes, backward");
  m.def("dense_forward", &dense_forward, "GELU experts on every token, gate-scaled, forward");
  m.def("dense_backward", &dense_backward, "GELU experts on every token, gate-scaled, backward");
}
