"""Pure MoE math: no I/O, no Ray (torch only).

Shape legend used across the package: T tokens, D model dim, F expert hidden dim, E experts,
K top-k, N routed rows of one expert call (N = T*K for a whole batch).

    config     ModelConfig (the model's math, validated) and presets
    routing    gate scores (float32), top-k, normalisation, group-limited routing
    dispatch   the dispatch plan (rows grouped by expert, stable), chunks, gather and combine
    experts    MLP and SwiGLU experts, shared experts
    layers     the parts of an MoE layer, route_and_plan, add_shared_experts
    forward    THE forward loop over an ExpertBackend (LocalExperts here; RemoteExperts in serving/)
    model      MoEModel: every layer in one process
    init       deterministic random weights per (seed, layer, expert)
    placement  which deployment hosts each (layer, expert)
    reference  the oracle: a plain loop over experts
"""
