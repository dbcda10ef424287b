"""Benchmarks that drive the real pipeline: ``flexkd bench quality|speed|generation``.

Each writes ``benchmarks/results/<name>.{json,md,png}``, logs them to MLflow (experiment
``flexkd-bench``) and rebuilds ``benchmarks/RESULTS.md`` from the latest results. Imported only
by ``flexkd bench``, so the CLI starts without torch, Ray or matplotlib.
"""
