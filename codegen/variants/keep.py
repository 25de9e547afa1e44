"""keep: leave the site as the model wrote it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.config import VariantConfig
from attncc.facts import SiteFacts

from .base import Variant


@dataclass(frozen=True)
class Keep(VariantConfig):
    """Leave the site as the model wrote it."""

    variant: ClassVar[str] = "keep"


class KeepVariant(Variant):
    config = Keep
    title = "keep"
    rewrites = False

    def check(self, site: SiteFacts, config: Keep) -> str | None:
        return None


VARIANT = KeepVariant()
