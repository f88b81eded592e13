"""Dispatch strategies: how one device's tokens reach their experts and come back (see ``base``)."""

from moe.dispatch.base import DispatchPlan, LocalRoute, exchange, move_rows
from moe.dispatch.capacity import capacity_dispatch
from moe.dispatch.dropless import dropless_dispatch
from moe.dispatch.single import single_dispatch

DISPATCH = {"capacity": capacity_dispatch, "dropless": dropless_dispatch}

__all__ = ["DISPATCH", "DispatchPlan", "LocalRoute", "capacity_dispatch", "dropless_dispatch", "exchange",
           "move_rows", "single_dispatch"]
