"""Benchmarks and stand-in servers: what measures kdgate, never part of it.

Installed with the ``bench`` extra (``pip install 'kdgate[bench]'``); the product packages
(``gateway``, ``router``, ``distiller``, ``store``) never import it. Stand-ins are real servers on
loopback that speak a documented protocol where the real thing cannot run here (a paid teacher
API, a GPU vLLM server); every result obtained with one says so.
"""
