"""gistlib: HyperLlama from scratch. Gist masks, canonical gist prefixes, gisting-based hypernetworks."""

__version__ = "0.1.0"
