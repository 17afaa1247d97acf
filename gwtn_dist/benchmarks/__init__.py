"""Every benchmark the ``gwtn`` command runs, inside the package so an installed wheel has them.

``step`` (``gwtn bench step|imitate``), ``kernels`` (``gwtn bench kernels``: its options) and
``imitation_kernels`` (the kernel sweep it runs) with ``timing`` (CUDA events, peak memory),
``data`` (``python -m gwtn_dist.benchmarks.data``: the data path) and ``distributed``
(``python -m gwtn_dist.benchmarks.distributed``: teacher placement across world sizes). The
top-level ``benchmarks/`` folder of the checkout is the GPU check (``gpu_check.sh``), not this.
Run as commands or scripts, never collected by pytest.
"""
