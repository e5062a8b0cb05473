"""blda: measure and remove class bias in segmentation and classification models.

The library is the product; the `blda` command line (package `blda_cli`, sources in `cli/`)
only parses options and calls into these modules.
"""

__version__ = "0.1.0"
