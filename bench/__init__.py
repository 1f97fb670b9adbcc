"""Benchmarks: offline throughput, serving and the Triton kernels (print a table, write JSON).

Run each as a module from the repository root, e.g. `python -m bench.kernels`."""
