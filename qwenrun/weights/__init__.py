"""Model weights: fetching the known models (:mod:`~qwenrun.weights.fetch`), converting a GGUF file
to safetensors (:mod:`~qwenrun.weights.convert`), and writing random-weight tiny models of every
Qwen family for tests (:mod:`~qwenrun.weights.tiny`, its chat templates in
:mod:`~qwenrun.weights.tiny_templates`). Nothing here imports vLLM."""
