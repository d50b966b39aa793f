"""Seeing a gateway: the state-directory lock, ``check``, ``status`` over a control socket, metrics."""
