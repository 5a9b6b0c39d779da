"""The output layer: what a registration leaves for its user (``overview``: the PNG summary of one pair)."""
