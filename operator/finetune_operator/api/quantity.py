"""Kubernetes resource quantities as numbers: ``"80Gi"`` is 85,899,345,920 bytes.

A quantity (``k8s.io/apimachinery/pkg/api/resource``) is a decimal number followed by one suffix: a
binary SI suffix (``Ki``, ``Mi``, ``Gi``, ``Ti``, ``Pi``, ``Ei``: powers of 1024), a decimal SI suffix
(``n``, ``u``, ``m``, none, ``k``, ``M``, ``G``, ``T``, ``P``, ``E``: powers of 1000), or a decimal
exponent (``1e9``, ``5E-3``). :data:`.v1alpha1.QUANTITY_PATTERN` decides what the API accepts; this
module turns an accepted string into its exact value (a :class:`~fractions.Fraction`, no float
rounding) and a byte count.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_QUANTITY = re.compile(r"^([+-]?)([0-9]*\.?[0-9]*)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][-+]?[0-9]+)?$")


def quantity_value(quantity: str | int) -> Fraction:
    """The exact value of a Kubernetes quantity (``"1.5Gi"`` -> 1610612736); ValueError if it is not one."""
    text = str(quantity).strip()
    match = _QUANTITY.fullmatch(text)
    if match is None or match.group(2) in ("", "."):
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    sign, number, suffix = match.group(1), match.group(2), match.group(3) or ""
    value = Fraction(number)
    if suffix in _BINARY:
        value *= 1024 ** _BINARY[suffix]
    elif suffix in _DECIMAL:
        value *= Fraction(10) ** _DECIMAL[suffix]
    else:  # an exponent, e.g. e9
        value *= Fraction(10) ** int(suffix[1:])
    return -value if sign == "-" else value


def quantity_bytes(quantity: str | int) -> int:
    """A quantity of memory in whole bytes, rounded up as Kubernetes does (``"1.5k"`` -> 1500)."""
    return math.ceil(quantity_value(quantity))
