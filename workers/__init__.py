"""relaycrypt: workers."""
