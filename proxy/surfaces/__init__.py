"""Where a request names its models (SPEC §3.3): pure readers shared by the data plane,
``explain`` and the tests. ``named_models`` is the entry point; see ``extract``."""

from proxy.surfaces.errors import BodyError
from proxy.surfaces.extract import Named, named_models, query_models

__all__ = ["BodyError", "Named", "named_models", "query_models"]
