"""Serving the engine over HTTP: the OpenAI-compatible app (:mod:`phi3v_tools.serving.app`) and its protocol
(:mod:`phi3v_tools.serving.protocol`)."""
