"""depot's benchmarks.

``python -m bench all --size 1GiB`` runs the performance suite (``bench/__main__.py``): the
machine's limits, depot and its peers on the same files, in one run, printed as a table and
written as JSON. The other files here stay runnable as scripts (``python bench/read_bench.py``);
they import each other as top-level modules, with this folder on ``sys.path``.
"""
