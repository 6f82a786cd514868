"""Bridges to training frameworks: ``integrations.lightning``,
``integrations.accelerate`` and ``integrations.transformers``.

Each module imports its framework when it is imported itself; nothing in the
core (``presam_kernels`` and its ``optim``, ``backends`` packages) imports
any of them.
"""
