"""The local engine, split as vLLM V1 splits it.

- :mod:`~phi3v_tools.engine.types`: requests, results, the Backend protocol (no torch);
- :mod:`~phi3v_tools.engine.prompts`: message checks, image tags, the schema prompt (no torch);
- :mod:`~phi3v_tools.engine.scheduler`: waiting queue, admission by token and KV budgets (no torch);
- :mod:`~phi3v_tools.engine.model_runner`: vision, chunked prefill, the batched decode step, KV memory;
- :mod:`~phi3v_tools.engine.sampler`: greedy/seeded sampling under grammar masks;
- :mod:`~phi3v_tools.engine.output`: detokenizing, streaming, closing and validating JSON;
- :mod:`~phi3v_tools.engine.core`: the :class:`~phi3v_tools.engine.core.Engine` step loop tying them together.

Importing this package imports nothing heavy; the submodules that need torch import it themselves.
"""
