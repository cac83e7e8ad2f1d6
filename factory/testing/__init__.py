"""Test helpers that ship with the package so benchmarks and later jobs' tests can use them."""
