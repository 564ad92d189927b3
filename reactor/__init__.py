"""relaycrypt: reactor."""
