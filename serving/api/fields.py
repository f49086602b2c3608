"""Field types shared by the request bodies, so that validation accepts exactly what the schema says.

The bodies validate in pydantic's strict mode (no "3" for 3, no 0 for false, no 1 for true), which is what
the JSON Schema of /openapi.json promises. JSON has one number type, though, and JSON Schema's "integer"
includes 3.0, so json_int() takes integral floats as ints.

>>> top_k: json_int(ge=1) | None = Field(None, description="...")
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

# A schema pattern: a string with something other than whitespace, for fields validated with pydantic's
# strip_whitespace (Unicode White_Space, as JSON Schema's \s; Python's str.strip() also strips U+001C..U+001F).
NOT_BLANK = r"\S"


def _integral(value: Any) -> Any:
    return int(value) if type(value) is float and value.is_integer() else value


def json_int(**constraints: int) -> Any:
    """An int field type with `constraints` (ge, le); they sit on the int itself, so the schema shows them as
    minimum / maximum (on a Field around the converter pydantic could not translate them)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]
