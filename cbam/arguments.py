"""The checks of an argument's value against what it accepts, each raising
:class:`~cbam.errors.InvalidArgument` (``argument=value: what is accepted``), which the config checks name
by its config key.

Every constructor of the project (attention options, networks, data modules, callbacks, strategies) checks
its arguments with these, so that one kind of rule reads and fails the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from cbam.errors import InvalidArgument


def _or_null(accepted: str, null_ok: bool, null_means: str | None) -> str:
    if not null_ok:
        return accepted
    return f"{accepted}, or null" + (f" ({null_means})" if null_means else "")


def check_integer(
    argument: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    odd: bool = False,
    null_ok: bool = False,
    null_means: str | None = None,
    maximum_is: str | None = None,
) -> None:
    """``value`` is an integer (not a bool: true is not a batch size) within ``[minimum, maximum]``, odd if
    ``odd``, or None where ``null_ok`` (``null_means`` says what None does; ``maximum_is`` what the maximum
    is)."""
    if null_ok and value is None:
        return
    kind = "an odd integer" if odd else "an integer"
    if minimum is not None and maximum is not None:
        accepted = f"must be {kind} between {minimum} and {maximum}"
    elif minimum is not None:
        accepted = f"must be {kind} >= {minimum}"
    elif maximum is not None:
        accepted = f"must be {kind} <= {maximum}"
    else:
        accepted = f"must be {kind}"
    if maximum_is:
        accepted += f", {maximum_is}"
    fits = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
        and (not odd or value % 2 == 1)
    )
    if not fits:
        raise InvalidArgument(argument, value, _or_null(accepted, null_ok, null_means))


def check_number(
    argument: str,
    value: Any,
    *,
    above: float | None = None,
    minimum: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
    unit: str | None = None,
    null_ok: bool = False,
    null_means: str | None = None,
) -> None:
    """``value`` is a real number (an int or a float, not a bool) ``> above`` or ``>= minimum``, and
    ``< below`` or ``<= maximum``; or None where ``null_ok``."""
    if null_ok and value is None:
        return
    kind = f"a number of {unit}" if unit else "a number"
    if minimum is not None and (below is not None or maximum is not None):
        upper = f"{below:g})" if below is not None else f"{maximum:g}]"
        accepted = f"must be {kind} in [{minimum:g}, {upper}"
    else:
        bounds = [
            f"> {above:g}" if above is not None else "",
            f">= {minimum:g}" if minimum is not None else "",
            f"< {below:g}" if below is not None else "",
            f"<= {maximum:g}" if maximum is not None else "",
        ]
        accepted = " ".join([f"must be {kind}", *(bound for bound in bounds if bound)])
    fits = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value  # not NaN
        and (above is None or value > above)
        and (minimum is None or value >= minimum)
        and (below is None or value < below)
        and (maximum is None or value <= maximum)
    )
    if not fits:
        raise InvalidArgument(argument, value, _or_null(accepted, null_ok, null_means))


def check_choice(argument: str, value: Any, accepted: Iterable[Any]) -> None:
    """``value`` is one of ``accepted`` (a tuple of names, or a mapping whose keys are the names)."""
    names = tuple(accepted)
    if isinstance(value, bool) or value not in names:
        raise InvalidArgument(argument, value, f"accepted values are {', '.join(map(str, names))}")


def check_flag(argument: str, value: Any) -> None:
    """``value`` is true or false (a YAML ``no`` or ``"yes"`` is a string, not a switch)."""
    if not isinstance(value, bool):
        raise InvalidArgument(argument, value, "must be true or false")


def check_names(argument: str, value: Any, accepted: Iterable[str] | None = None) -> None:
    """``value`` is a non-empty list of names (strings), each one of ``accepted`` where given."""
    names = None if accepted is None else tuple(accepted)
    listed = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    if not listed or not all(isinstance(name, str) and name for name in value):
        described = f"out of {', '.join(names)}" if names else "(strings)"
        raise InvalidArgument(argument, value, f"must be a list of names {described}")
    if names is not None:
        for name in value:
            check_choice(argument, name, names)
