"""Serving: an OpenAI-compatible HTTP server (`python -m qwenvl_jax.serve`) over a
continuous-batching engine.

    engine.py   requests in, token events out (slots, KV cache, image-feature cache)
    app.py      the FastAPI app: endpoints, streaming, errors, stop strings, grounding boxes
    schema.py   request bodies (pydantic)      prompt.py  messages -> ChatML ids + images
    images.py   image_url sources -> pixels    metrics.py Prometheus
    server.py   load + engine + uvicorn        bench.py   `python -m qwenvl_jax.bench --mode=serve`

Needs the `serve` extra: pip install 'qwenvl_jax[serve]'.
"""
