"""Training and evaluating the network with MONAI: ``data`` (datalists, checks and transforms), ``engines``
(trainer / evaluator), ``metrics`` (TRE as an Ignite metric and its report)."""
