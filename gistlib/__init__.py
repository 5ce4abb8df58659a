"""gistlib: HyperLlama from scratch. Gist masks, canonical gist prefixes, gisting-based hypernetworks."""

from ._quiet import quiet_hub_kernel_lookup

__version__ = "0.1.0"

quiet_hub_kernel_lookup()  # before anything imports bitsandbytes (gistlib._quiet says why)
