"""Tests load the isochrones through observer's disk cache, as the service does."""

from observer.isochrone_cache import install

install()
