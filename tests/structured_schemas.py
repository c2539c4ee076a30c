"""Finite JSON schemas for constrained-decoding tests: every instance is short, so a random
model's output under the grammar always completes well within a tiny model's context."""
from __future__ import annotations

NAME = {"type": "string", "maxLength": 4}
SMALL_INT = {"type": "integer", "minimum": -5, "maximum": 99}
COLOR = {"enum": ["red", "green", "blue"]}


def obj(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object; every property required unless `required` says otherwise."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": list(properties) if required is None else required}


SCHEMAS: list[dict] = [
    obj({"name": NAME, "age": SMALL_INT}),
    obj({"color": COLOR}),
    obj({"ok": {"type": "boolean"}}),
    obj({"n": {"type": "integer", "minimum": 0, "maximum": 9}}),
    obj({"x": {"type": "integer", "minimum": 0, "maximum": 1}}) | {"required": []},
    obj({"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}}),
    obj({"tags": {"type": "array", "items": COLOR, "minItems": 1, "maxItems": 3}}),
    obj({"pts": {"type": "array", "items": SMALL_INT, "maxItems": 2}}),
    obj({"inner": obj({"a": {"type": "boolean"}, "b": COLOR})}),
    obj({"inner": obj({"deep": obj({"v": SMALL_INT})})}),
    obj({"maybe": {"type": ["string", "null"], "maxLength": 3}}),
    obj({"maybe": {"anyOf": [SMALL_INT, {"type": "null"}]}}),
    obj({"v": {"anyOf": [{"type": "boolean"}, COLOR]}}),
    obj({"v": {"anyOf": [obj({"kind": {"const": "a"}, "n": SMALL_INT}),
                         obj({"kind": {"const": "b"}, "s": NAME})]}}),
    {"$defs": {"pt": obj({"x": SMALL_INT, "y": SMALL_INT})}, **obj({"p": {"$ref": "#/$defs/pt"}})},
    {"$defs": {"c": COLOR}, **obj({"a": {"$ref": "#/$defs/c"}, "b": {"$ref": "#/$defs/c"}})},
    obj({"a": NAME, "b": NAME}, required=["a"]),
    obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}}, required=[]),
    obj({"const": {"const": "fixed"}, "n": SMALL_INT}),
    obj({"day": {"enum": ["mon", "tue", "wed", 1, 2, None, True]}}),
    {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": obj({"k": COLOR}), "maxItems": 2},
    {"type": "array", "prefixItems": [{"type": "boolean"}, COLOR], "items": False, "minItems": 2},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "boolean"},
    {"type": "null"},
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "string", "pattern": "^[A-Z][a-z]{1,3}$"},
    {"type": "string", "enum": ["α", "β", "日本"]},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "string", "maxLength": 2}]},
    obj({"grid": {"type": "array", "maxItems": 2,
                  "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3},
                            "maxItems": 2}}}),
    obj({"user": obj({"name": NAME, "role": {"enum": ["admin", "guest"]}}), "active": {"type": "boolean"}}),
    obj({"score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    obj({"temp": {"enum": [-1, 0, 0.5, 1]}}),
    obj({"oneof": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}}),
    obj({"allof": {"allOf": [{"type": "integer"}, {"minimum": 1, "maximum": 3}]}}),
    obj({"code": {"type": "string", "pattern": "^[0-9]{2}-[0-9]{2}$"}, "color": COLOR}),
    obj({"list": {"type": "array", "items": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
                  "minItems": 2, "maxItems": 2}}),
    {"$defs": {"leaf": obj({"v": {"type": "boolean"}}), "node": obj({"l": {"$ref": "#/$defs/leaf"},
                                                                     "r": {"$ref": "#/$defs/leaf"}})},
     "$ref": "#/$defs/node"},
]
