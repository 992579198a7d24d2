"""observer."""

from observer.isochrone_cache import install as _install_isochrone_cache

_install_isochrone_cache()
