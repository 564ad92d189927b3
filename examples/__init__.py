"""relaycrypt: examples."""
