"""Training: a small MoE language model whose MoE blocks are this project's routing, dispatch and
experts (with autograd), inside a transformers Mixtral, so that what is trained is served by the
same path as any imported checkpoint (train -> import-hf -> serve -> generate).

    data         text on every machine (stdlib source, manual pages), split by document; byte-level BPE
    moe_block    TrainableMoEBlock: core.routing + core.dispatch + core.experts, trainable
    model        TrainConfig + presets, the Mixtral MoE and the dense (Mistral) baseline, export
    balance      Switch aux loss, router z-loss, DeepSeek-V3 loss-free bias update, max violation
    loop         the training loop (several models, same batches), Comm for data parallelism
    evaluate     perplexity over non-overlapping windows, unigram baseline, loads, expert masking
    plots        loss.png, experts.png, domains.png
    pipeline     `moe-cluster train` start to end
    distributed  Ray Train (TorchTrainer, gloo): --workers W          (Ray)
    cluster      perplexity with the MoE blocks on the cluster        (Ray Serve)
    cli          the flags of `train` and `perplexity`
"""
