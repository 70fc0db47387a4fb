"""Grants with constraints between the proto and the domain: checked, named, round-tripped."""

from __future__ import annotations

import pytest

from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.errors import InvalidRequestError
from sidecar.server.convert import grant_message, grants
from tokens import Constraint, Grant

REFUND = Grant(
    "requestRefund",
    {"invoice_id": "in_93K2"},
    {"amount": Constraint(min="0.01", max="50"), "currency": Constraint(one_of=["USD", "EUR"])},
)


def test_a_grant_survives_the_round_trip_through_the_proto() -> None:
    """grant_message then grants gives back the same grant, bounds as decimal text."""
    message = grant_message(REFUND)
    assert message.constraints["amount"].max == "50"
    assert list(message.constraints["currency"].one_of) == ["EUR", "USD"]
    assert grants([message]) == (REFUND,)


@pytest.mark.parametrize(
    ("constraint", "problem"),
    [
        (token_pb.Constraint(), "needs min, max or one_of"),
        (token_pb.Constraint(max="5e1"), "decimal string"),
        (token_pb.Constraint(min="9", max="1"), "above max"),
        (token_pb.Constraint(max="1", one_of=["a"]), "not both"),
        (token_pb.Constraint(one_of=["a", "a"]), "repeats"),
    ],
)
def test_a_bad_constraint_is_invalid_naming_its_field(
    constraint: token_pb.Constraint, problem: str
) -> None:
    """A malformed constraint is INVALID_ARGUMENT with the grant and argument in the field."""
    message = token_pb.Grant(tool="t", constraints={"amount": constraint})
    with pytest.raises(InvalidRequestError) as caught:
        grants([token_pb.Grant(tool="ok"), message])
    assert caught.value.field == "grants[1].constraints[amount]"
    assert problem in caught.value.message


def test_a_constraint_name_must_be_an_identifier() -> None:
    """Constraint names follow the same rule as pin names: printable ASCII, no spaces."""
    message = token_pb.Grant(tool="t", constraints={"the amount": token_pb.Constraint(max="1")})
    with pytest.raises(InvalidRequestError) as caught:
        grants([message])
    assert caught.value.field == "grants[0].constraints"
