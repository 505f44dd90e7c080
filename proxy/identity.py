"""API keys (SPEC §3.2): issue, parse, and verify against HMAC-SHA-256 digests under a pepper.

A key reads ``sk-ap-<key_id>-<secret>``: the key id (48 random bits, hex) names the stored record,
the secret carries 256 random bits. Only ``HMAC-SHA-256(pepper, key)`` is stored, with the pepper's
version, so the pepper can rotate: new keys use the current pepper, older keys keep verifying
with the pepper they were made under.

Peppers come from an env var (``keys.pepper_env``) or a file (``keys.pepper_file``), as
``version:secret`` entries separated by commas, current first; a bare secret is version ``v1``.
With embedded Redis and no pepper configured, one is generated in the state directory.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from proxy import env

KEY_PREFIX = "sk-ap-"
_KEY_ID_LEN = 12
_KEY_ID = re.compile(r"[0-9a-f]{12}")  # as new_key writes it: no sign, prefix, case or "_"


class PepperError(Exception):
    pass


@dataclass(frozen=True)
class Peppers:
    current: str  # version used for new keys
    secrets: dict[str, bytes]

    def digest(self, key: str, version: str | None = None) -> bytes | None:
        secret = self.secrets.get(version or self.current)
        if secret is None:
            return None
        return hmac.digest(secret, key.encode(), "sha256")


def parse_peppers(text: str) -> Peppers:
    entries = [e.strip() for e in text.strip().split(",") if e.strip()]
    if not entries:
        raise PepperError("the pepper is empty")
    out: dict[str, bytes] = {}
    current = ""
    for i, entry in enumerate(entries):
        version, sep, secret = entry.partition(":")
        if not sep:
            version, secret = "v1", entry
        if len(secret) < 16:
            raise PepperError(f"pepper {version!r} is shorter than 16 characters")
        out[version] = secret.encode()
        if i == 0:
            current = version
    return Peppers(current, out)


def load_peppers(env_name: str, file: str | None, state_dir: str | None) -> Peppers:
    """From the env var, else the configured file, else (embedded Redis) the state directory."""
    value = env.secret(env_name)
    if value:
        return parse_peppers(value)
    if file:
        try:
            return parse_peppers(Path(file).read_text())
        except OSError as exc:
            raise PepperError(f"cannot read pepper file {file}: {exc.strerror}") from None
    if state_dir is None:
        raise PepperError(
            f"no pepper: set env {env_name} (or keys.pepper_file); required with external Redis"
        )
    path = Path(state_dir) / "pepper"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("v1:" + secrets.token_urlsafe(32))
    return parse_peppers(path.read_text())


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key)."""
    key_id = secrets.token_hex(_KEY_ID_LEN // 2)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The key id inside a well-formed key, or None for anything malformed."""
    if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + _KEY_ID_LEN + 33:
        return None
    key_id = key[len(KEY_PREFIX) : len(KEY_PREFIX) + _KEY_ID_LEN]
    if key[len(KEY_PREFIX) + _KEY_ID_LEN] != "-" or not _KEY_ID.fullmatch(key_id):
        return None
    return key_id


def verify(peppers: Peppers, key: str, digest: bytes, version: str) -> bool:
    expected = peppers.digest(key, version)
    return expected is not None and hmac.compare_digest(expected, digest)
