"""Triton kernels of spamkern (installed as ``spamkern.kernels``).

Each submodule is one operation (kernels, launcher, registration with
:mod:`spamkern.dispatch`) and needs ``triton``. They are imported one by one by
``spamkern.dispatch`` (``kernel_module(name)``), so a module that fails to load is reported
on its own and never takes the others down.
"""
