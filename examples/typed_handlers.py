"""Typed poolport handlers: what a handler module looks like (served by config/typed.yaml).

From Erlang::

    {ok, <<"Hello, World">>} = poolport:call(P, typed_handlers, greet, ["World"]),
    {ok, <<"Hello, World">>} = poolport:call(P, typed_handlers, greet, [<<"World">>]),
    Order = #{item => <<"tea">>, quantity => 3, unit_price => 2.5},
    {ok, #{item := <<"tea">>, total := 7.5}} = poolport:call(P, typed_handlers, quote, [Order]),
    {ok, positive} = poolport:call(P, typed_handlers, classify, [<<"I love this, it is great">>]).

From Elixir::

    {:ok, "Hello, World"} = :poolport.call(:typed, :typed_handlers, :greet, ["World"])
    order = %{"item" => "tea", "quantity" => 3, "unit_price" => 2.5}
    {:ok, %{item: "tea", total: 7.5}} = :poolport.call(:typed, :typed_handlers, :quote, [order])
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from typing import Optional

import msgspec

import poolport


def greet(name: str) -> str:
    """``name`` arrives as a str whether Erlang sent "World", <<"World">> or 'World'."""
    return f"Hello, {name}"


class Order(msgspec.Struct):
    """From a map with atom keys (``#{item => ...}``) or binary keys (``%{"item" => ...}``)."""

    item: str
    quantity: int
    unit_price: float
    note: Optional[str] = None


class Quote(msgspec.Struct):
    item: str
    total: float


def quote(order: Order) -> Quote:
    """A Struct argument and a Struct result (it goes back as ``#{item => ..., total => ...}``)."""
    return Quote(order.item, round(order.quantity * order.unit_price, 2))


# --- per-worker state: a "model" loaded once per worker process ----------------------------


class Sentiment(enum.Enum):
    POSITIVE = 1
    NEGATIVE = 2
    NEUTRAL = 3  # an Enum result goes back as the atom of its lowercased name: neutral


@dataclasses.dataclass(frozen=True)
class Model:
    positive: re.Pattern
    negative: re.Pattern
    word: re.Pattern
    pid: int


def load_model(positive: list[str], negative: list[str]) -> Model:
    """``worker_init``: runs once in each worker before it serves; the result is the worker's state.

    A real one would load weights from disk; compiling the word tables stands in for that.
    """
    def table(words: list[str]) -> re.Pattern:
        alternatives = "|".join(map(re.escape, sorted(words)))
        return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)

    return Model(table(positive), table(negative), re.compile(r"\w+"), os.getpid())


def classify(text: str) -> Sentiment:
    model: Model = poolport.worker_state()  # this worker's model, loaded once by load_model
    score = len(model.positive.findall(text)) - len(model.negative.findall(text))
    if score > 0:
        return Sentiment.POSITIVE
    return Sentiment.NEGATIVE if score < 0 else Sentiment.NEUTRAL


@poolport.handler(timeout_ms=2000, name="words")
def tokenize(text: str, limit: int = 100) -> list[str]:
    """Exposed as ``typed_handlers:words``; 2 s timeout unless the config says otherwise."""
    return poolport.worker_state().word.findall(text)[:limit]


def model_pid() -> int:
    """The pid of the process that loaded this worker's model (= the worker's own pid)."""
    return poolport.worker_state().pid
