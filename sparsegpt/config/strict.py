"""The base of every recipe section: strict pydantic models whose unknown keys are errors naming the allowed ones
(and the closest, when one is close). Its own module so the sections can be split over modules by concern."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors that list the allowed ones."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = [field.alias or name for name, field in cls.model_fields.items()]
            for key in data:
                if key not in allowed and key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), allowed, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
        return data
