"""What differs between the transformers releases the integration runs on.

transformers 5.24 renamed the cache argument of every model's and attention module's
``forward`` from ``past_key_values`` to ``cache``. An argument of the other name is not
an error there: it lands in ``**kwargs`` and is ignored, so a forward given the cache
under the wrong name runs without it (a ``GraphedDecoder`` step would replay over an
empty cache). ``cache_kwarg`` reads the name from the signature.
"""
from __future__ import annotations

import inspect


def cache_kwarg(module) -> str:
    """The name ``module.forward`` takes its cache under: ``"cache"`` (transformers 5.24
    on) or ``"past_key_values"`` (before)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
