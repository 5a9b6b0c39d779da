"""The lung-mask layer: automatic lung masks of CT volumes in HU, lung boxes and the MONAI transforms for them
(``lung_mask``)."""
