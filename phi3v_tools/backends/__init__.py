"""Backends other than the local engine: :mod:`phi3v_tools.backends.openai`, any OpenAI-compatible server."""
