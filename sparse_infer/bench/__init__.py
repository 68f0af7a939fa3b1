"""Speed benchmarks behind `sparse-infer bench` and the scripts in benchmarks/.

``attention`` times the executors on synthetic indices, ``prefill`` and ``decode`` time a
loaded model end to end; ``layer``, ``patching`` and ``timing`` are the shared pieces
(one layer outside a model, a plan for a `with` block, GPU-aware timing).
"""
