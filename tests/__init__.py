"""A regular package, so that ``tests.tiny_sd`` is this folder even where a dependency installs a top-level
``tests`` package into site-packages (torch-fidelity 0.4 does).
"""
