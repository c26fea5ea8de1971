"""SMoE-Dropout's mixture-of-experts pieces: router, k schedules, dispatch, experts and the layer.

Shape legend, one meaning per letter across ``smoe_ds.moe`` and ``smoe_ds.models`` (tensor names
carry their shape as a suffix, torchtitan style: ``x_SD`` is [S, D]):

- B batch, L sequence length, V vocabulary, A attention heads, Dh head size (models);
- S tokens on this rank (B x L, flattened), D d_model;
- N experts in all, K active experts per token (the k of the schedule);
- P ranks in the expert-parallel group (ep_size), E = N / P experts held by this rank;
- T tokens reaching this rank's experts (after dispatch), H an expert's hidden width;
- R = T x K routes, (token, expert) pairs in token-major order (a route dropped by a capacity keeps
  gate 0); Q rows of the padded route buffer (R, each expert's group padded to the grouped GEMM's
  alignment: ``smoe_ds.moe.routes``);
- M rows sent in the all-to-all (messages), X = D + E payload columns (the token and its gates),
  Y = min(K, P) slots per token for the rows coming back.
"""
