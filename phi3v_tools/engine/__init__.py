"""The local engine, split as vLLM V1 splits it.

- :mod:`~phi3v_tools.engine.types`: requests, results, the Backend protocol (no torch);
- :mod:`~phi3v_tools.engine.prompts`: message checks, image tags, the schema prompt (no torch);
- :mod:`~phi3v_tools.engine.scheduler`: admission by row, KV and LongRoPE limits, prefill chunks (no torch);
- :mod:`~phi3v_tools.engine.preparation`: hashing, cache look-ups, HD transform, token ids (off the step loop);
- :mod:`~phi3v_tools.engine.vision`: the uncached images of a step, encoded in one batch;
- :mod:`~phi3v_tools.engine.model_runner`: loading, chunked prefill, the batched decode step, the KV cache;
- :mod:`~phi3v_tools.engine.sampler`: greedy/seeded sampling under grammar masks;
- :mod:`~phi3v_tools.engine.output`: detokenizing, streaming, closing and validating JSON;
- :mod:`~phi3v_tools.engine.stream`: a request's text pieces to an event loop;
- :mod:`~phi3v_tools.engine.core`: the :class:`~phi3v_tools.engine.core.Engine` step loop tying them together.

Importing this package imports nothing heavy; the submodules that need torch import it themselves.
"""
