"""Secret sources: where PINs, certificate chains and ticket keys come from, and whether
they changed."""
