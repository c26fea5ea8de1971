"""SMoE-Dropout's mixture-of-experts pieces: router, k schedules, dispatch, experts and the layer.

Shape legend, one meaning per letter across ``smoe_ds.moe`` and ``smoe_ds.models`` (tensor names
carry their shape as a suffix, torchtitan style: ``x_SD`` is [S, D]):

- B batch, L sequence length, V vocabulary, A attention heads, Dh head size (models);
- S tokens on this rank (B x L, flattened), D d_model;
- N experts in all, K active experts per token (the k of the schedule);
- P ranks in the expert-parallel group (ep_size), E = N / P experts held by this rank;
- T tokens reaching this rank's experts (after dispatch), H an expert's hidden width;
- R routes: (token, local expert) pairs with a non-zero gate, sorted by expert;
- M rows sent in the all-to-all (messages), X = D + E payload columns (the token and its gates);
- G a group of routes run together (the CPU sparse path's route buffers).
"""
