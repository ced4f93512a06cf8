"""The OpenAI API's engine (no Ray, no HTTP): continuous batching of a whole model whose MoE blocks run
elsewhere. scheduler.py (the DecodeLoop: admission, steps, events), sequence.py (a request and its
state), kv_cache.py (each sequence's cache, allocated once; the packed attention), forward.py (one
packed forward per step), step_cost.py (how much prompt a step may carry), sampling.py + penalties.py,
logprobs.py, stopping.py, text.py (tokenizer, chat prompts, the streamed text). docs/engine.md."""
