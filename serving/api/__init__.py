"""The OpenAI-compatible HTTP API (no torch, no Ray): the app and its routes (app.py), streaming
(stream.py), errors and the auth/size guard (errors.py), request and response bodies (requests.py,
responses.py, logprobs.py) and the retrieval routes (retrieval.py, retrieval_bodies.py). It calls an
engine only through serving/engine_client.py."""
