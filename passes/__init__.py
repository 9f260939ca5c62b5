"""FX graph passes of swpfx, one verb-named pass per module.

- insert_skeletons: give every Conv2d a learnable filter skeleton (prepare)
"""
