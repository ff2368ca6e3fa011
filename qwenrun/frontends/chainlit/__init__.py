"""The Chainlit front end (``frontend.kind: chainlit``): :mod:`~qwenrun.frontends.chainlit.app`
serves the chat UI, :mod:`~qwenrun.frontends.chainlit.view` turns one turn's events into its
messages and steps. Needs the ``chainlit`` extra."""
