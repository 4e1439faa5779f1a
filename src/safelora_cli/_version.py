"""The package version, in a module of its own: every module that needs it imports it from here, never
from the package root (which would import the API)."""

__version__ = "0.3.0"
