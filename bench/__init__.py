"""fedjewel benchmarks: each prints a table and, with `--json`, machine-readable figures.

Run all with `python -m bench` (or `make bench`); each alone with
`python -m bench.<name>`. Figures are ratios measured side by side in one run:
absolute times on a shared machine are noise.
"""
