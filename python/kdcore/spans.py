"""Span ids of agent trajectories."""

from __future__ import annotations

import enum


class Span(enum.IntEnum):
    """What a token of an agent trajectory is; any small integer id also works."""

    PROMPT = 0
    REASON = 1
    ACT = 2
    OBSERVATION = 3
