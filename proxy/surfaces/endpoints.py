"""Which OpenAI endpoint a request is for, judged on its path as an upstream would route it.

The path is compared after percent-decoding, merging repeated slashes, resolving ``.`` and
``..`` segments, dropping ``;parameters`` and a trailing slash, and lower-casing, so
``/v1//Batches/`` or ``/v1/./batches;x`` is the batches endpoint here as it is upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

MODELS_PREFIX = "/v1/models/"


@dataclass(frozen=True, slots=True)
class Endpoint:
    family: str  # chat, responses, embeddings, audio, images, files, batches, ...
    requires_model: bool = False  # POST without a model → 400
    kind: str = "plain"  # plain | batch_upload | batch_create | model_path | model_list


OTHER = Endpoint("other")
MODEL_PATH = Endpoint("models", kind="model_path")
MODEL_LIST = Endpoint("models", kind="model_list")

# POST endpoints by canonical path.
_POST: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint("chat", True),
    "/v1/completions": Endpoint("completions", True),
    "/v1/responses": Endpoint("responses", True),
    "/v1/embeddings": Endpoint("embeddings", True),
    "/v1/audio/transcriptions": Endpoint("audio", True),
    "/v1/audio/translations": Endpoint("audio", True),
    "/v1/audio/speech": Endpoint("audio", True),
    "/v1/images/generations": Endpoint("images"),
    "/v1/images/edits": Endpoint("images"),
    "/v1/images/variations": Endpoint("images"),
    "/v1/moderations": Endpoint("moderations"),
    "/v1/fine_tuning/jobs": Endpoint("fine-tuning", True),
    "/v1/assistants": Endpoint("assistants", True),
    "/v1/realtime/sessions": Endpoint("realtime", True),
    "/v1/realtime/client_secrets": Endpoint("realtime"),
    "/v1/files": Endpoint("files", kind="batch_upload"),
    "/v1/batches": Endpoint("batches", kind="batch_create"),
}
_FAMILIES = (
    ("/v1/chat/", "chat"),
    ("/v1/responses", "responses"),
    ("/v1/audio/", "audio"),
    ("/v1/images/", "images"),
    ("/v1/files", "files"),
    ("/v1/uploads", "files"),
    ("/v1/batches", "batches"),
    ("/v1/fine_tuning/", "fine-tuning"),
    ("/v1/realtime", "realtime"),
    ("/v1/models", "models"),
    ("/v1/moderations", "moderations"),
    ("/v1/embeddings", "embeddings"),
)
_CACHE_MAX = 4096
_cache: dict[tuple[str, str], tuple[Endpoint, str | None]] = {}


def canonical_path(path: str, *, strip_params: bool = True) -> str:
    """The path as routing compares it (case kept; see the module doc). ``;parameters`` are cut
    from the raw segments, before percent-decoding (an encoded ``%3B`` is part of a name)."""
    segments: list[str] = []
    for raw in path.split("/"):
        if strip_params:
            raw = raw.split(";", 1)[0]
        decoded = unquote(raw, errors="replace") if "%" in raw else raw
        for segment in decoded.split("/"):
            if segment in ("", "."):
                continue
            if segment == "..":
                if segments:
                    segments.pop()
                continue
            segments.append(segment)
    return "/" + "/".join(segments)


def endpoint_of(method: str, path: str) -> tuple[Endpoint, str | None]:
    """The endpoint, and for ``/v1/models/{model}`` the model the path names."""
    key = (method, path)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    canon = canonical_path(path)
    lower = canon.lower()
    found: tuple[Endpoint, str | None]
    if lower.startswith(MODELS_PREFIX) and len(canon) > len(MODELS_PREFIX):
        whole = canonical_path(path, strip_params=False)  # the model keeps its ';'
        found = (MODEL_PATH, whole[len(MODELS_PREFIX) :])
    elif lower == "/v1/models" and method == "GET":
        found = (MODEL_LIST, None)
    elif method == "POST" and lower in _POST:
        found = (_POST[lower], None)
    else:
        family = next((f for prefix, f in _FAMILIES if lower.startswith(prefix)), "other")
        found = (Endpoint(family) if family != "other" else OTHER, None)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = found
    return found
