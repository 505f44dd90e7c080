"""The demo's config ships inside the package (``proxy/demo.yaml``) so an installed demo runs from
any directory; it must stay ``config/proxy.yaml`` but for what the demo sets itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy import config as config_mod
from proxy.demo import shipped_config

REPO = Path(__file__).resolve().parents[2]
# What the demo's file may differ in: its listeners and tokens (set at run time), one more price,
# and the alpha's token limit (the demo shows a workspace paced by tokens).
DEMO_ONLY = (
    ("listen",),
    ("admin",),
    ("pricing", "models", "gpt-5.6-terra"),
    ("rate_limits", "programs", "gpt-5.5-alpha"),
)


def _without(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    *parents, last = path
    for key in parents:
        doc = doc.get(key, {})
    doc.pop(last, None)


def test_the_demo_config_is_the_shipped_config_but_for_the_demo_settings() -> None:
    demo = yaml.safe_load(shipped_config())
    shipped = yaml.safe_load((REPO / "config" / "proxy.yaml").read_text())
    for path in DEMO_ONLY:
        _without(demo, path)
        _without(shipped, path)
    assert demo == shipped, "update proxy/demo.yaml with the change made to config/proxy.yaml"


def test_the_demo_config_is_valid() -> None:
    cfg = config_mod.parse(shipped_config(), "proxy/demo.yaml")
    assert "gpt-5.6-terra" in cfg.pricing.models
    assert cfg.rate_limits.for_program("gpt-5.5-alpha").tokens_per_minute == 1000
