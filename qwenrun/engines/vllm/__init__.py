"""The ``vllm`` engine: vLLM's ``AsyncLLM`` in this process.

:mod:`~qwenrun.engines.vllm.engine` is the :class:`~qwenrun.engines.vllm.engine.VLLMEngine`,
:mod:`~qwenrun.engines.vllm.inputs` turns a request into vLLM's prompt and sampling inputs, and
:mod:`~qwenrun.engines.vllm.preflight` checks the machine before vLLM starts (its messages name
what to change in the agent file). vLLM itself is imported only when the engine starts."""
