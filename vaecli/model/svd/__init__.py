"""The SVD family: the SVD temporal VAE and the SD/SDXL image VAEs as plain modules named after the sgm keys.

`FAMILY` is what the registry (`vaecli.model.family.families`) lists; the rest of vaecli reaches this package
only through it.
"""

from vaecli.model.svd.family import SVDFamily

FAMILY = SVDFamily()
