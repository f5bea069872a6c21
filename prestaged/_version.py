"""The version of prestaged (its own module, so that every layer can name it without
importing the package facade, which re-exports every layer)."""

__version__ = "0.1.0"
