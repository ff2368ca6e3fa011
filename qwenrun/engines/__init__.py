"""Engines: where the model runs. The only package that imports vLLM.

* :mod:`~qwenrun.engines.base`: the :class:`~qwenrun.engines.base.Engine` protocol every backend
  implements (one request in, a stream of deltas out) and the request type.
* :mod:`~qwenrun.engines.settings`: the ``engine:`` table's models; :mod:`~qwenrun.engines.registry`:
  ``engine.kind`` -> backend.
* Backends: :mod:`~qwenrun.engines.vllm.engine` (vLLM's ``AsyncLLM`` in this process),
  :mod:`~qwenrun.engines.openai` (an OpenAI-compatible endpoint elsewhere),
  :mod:`~qwenrun.engines.scripted` (scripted replies, for tests and examples).
"""
