"""The words of the method options that take one of a few, in a module of their own: the package's option table,
the methods and the messages' Python spelling read them, and listing them imports no method (and no torch)."""

LAYER_FAMILIES = ("conv", "conv3x3", "attn", "all", "transformer", "locon", "full")  # what the low-rank methods' and OFT's `targets` name
ATOMS_INITS = ("svd", "sparse")
GIFT_GENERATORS = ("simple", "paca")
