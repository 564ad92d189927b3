"""relaycrypt: benchmarks."""
