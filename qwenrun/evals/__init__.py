"""``qwenrun eval``: tool-calling accuracy of an agent's model, scored like BFCL's AST checker.

:func:`qwenrun.evals.evaluate.evaluate` runs cases (:mod:`qwenrun.evals.cases`) through the
agent loop or the OpenAI server (:mod:`qwenrun.evals.runner`), then scores qwenrun's reading of
each output and vLLM's Hermes parser's reading of the same text (:mod:`qwenrun.evals.readers`,
:mod:`qwenrun.evals.checker`) into a :class:`~qwenrun.evals.report.Report`.
:mod:`qwenrun.evals.bfcl` imports BFCL v4 data. vLLM is imported only when an evaluation runs.
See ``docs/eval.md``.
"""
