"""relaycrypt: relay."""
