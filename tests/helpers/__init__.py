"""Helpers shared by the test files: tiny timm models (models), datasets in the benchmarks'
on-disk layouts (data), and the toy training task with its backbone weights (training).

Imported as ``tests.helpers.<module>``: pytest puts the repository root on ``sys.path`` for the
``tests`` package, so no helper is a top-level module that a test file finds by accident.
"""
