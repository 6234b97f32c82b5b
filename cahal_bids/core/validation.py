"""Checks of hyperparameters given to networks and trainers (ValueError naming the value).

>>> check_int('levels', 3, 1)
3
>>> check_int('levels', True, 1)
Traceback (most recent call last):
...
ValueError: levels must be an integer >= 1, got True
"""

from __future__ import annotations

__all__ = ['check_bool', 'check_int']


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be True or False, got {value!r}')
    return value
