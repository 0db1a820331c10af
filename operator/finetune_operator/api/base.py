"""Building blocks of the typed API: the base model and cross-field rules.

A cross-field rule is written once, as a :class:`Rule`, on the model it constrains. It carries both
forms the project needs:

* ``cel`` — a CEL expression that the CRD generator emits as an ``x-kubernetes-validations`` entry, so
  the API server refuses a bad manifest at admission, and
* ``check`` — the same predicate in Python, evaluated by pydantic whenever a model is built (in
  ``finetune validate``, ``finetune run`` and the operator), so the rule holds without a cluster too.

Both report ``message``, which names the offending field by its full path in the manifest.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Rule:
    """A cross-field validation rule, expressed in CEL and in Python.

    ``field`` is the path, relative to the model the rule is attached to, of the field the error is
    reported against (CEL's ``fieldPath``), e.g. ``".maxSteps"``. ``check`` receives the model
    instance and returns True when the rule holds.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field: str | None = None

    def to_crd(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field:
            rule["fieldPath"] = self.field
        return rule


RULE_ERROR_TYPE = "cross_field_rule"


class SpecModel(BaseModel):
    """Base of every API object: camelCase field names, unknown fields refused, rules enforced.

    Types are strict, as in the CRD's structural schema: a quoted number is not a number, a quoted
    boolean not a boolean (an integer is a valid number, as in JSON). Python code may build models by
    their Python (snake_case) field names; manifests are parsed with :func:`parse_manifest`, which
    accepts the camelCase names only, as the API server does.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        strict=True,
        allow_inf_nan=False,
        extra="forbid",
        validate_assignment=False,
        use_attribute_docstrings=False,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> SpecModel:
        for rule in type(self).rules:
            if not rule.check(self):
                raise PydanticCustomError(RULE_ERROR_TYPE, rule.message, {"field": rule.field or ""})
        return self

    @classmethod
    def parse_manifest(cls, data: Any) -> Self:
        """Validate manifest data: camelCase field names only (snake_case ones are unknown fields)."""
        return cls.model_validate(data, by_alias=True, by_name=False)

    def to_manifest(self) -> dict[str, Any]:
        """The object as it is written in a manifest: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def unwrap_annotation(tp: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` as ``X`` (a union of several types stays as it is)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            real = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(real) != 1:
                return tp
            tp = real[0]
        else:
            return tp
