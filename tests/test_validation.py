"""Bad client replies are rejected with a reason and never averaged in."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.adapters import get
from fedpeft.load import parse_config
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.validation import HEADER_ALLOWANCE, Rejected, StateSpec, reply_budget, validate_reply

SPEC = StateSpec({"w": ((2, 3), "float32"), "b": ((3,), "float32")}, frozen_hash="abc123")


def _state(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full((3,), value, np.float32)}


def _content(state=None, examples=10.0, frozen="abc123", client="c"):  # type: ignore[no-untyped-def]
    arrays = state_to_arrayrecord(_state() if state is None else state)
    return RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5, "epsilon": 1.0}),
        "info": ConfigRecord({"client": client, "frozen-hash": frozen}),
    })


def test_valid_reply_passes() -> None:
    rep = validate_reply(_content(), SPEC)
    assert rep.weight == 10 and rep.client == "c" and set(rep.state) == {"w", "b"}


def _padded(content: RecordDict, name: str, extra: int) -> RecordDict:
    """``content`` with ``extra`` bytes after tensor ``name``'s serialized array: its declared
    shape and dtype and its decoded values are unchanged (NumPy ignores what follows the data)."""
    arrays = content["arrays"]
    arr = arrays[name]
    padded = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data + b"\0" * extra)
    np.testing.assert_array_equal(padded.numpy(), arr.numpy())  # passes the shape, dtype and value checks
    new = ArrayRecord({k: (padded if k == name else v) for k, v in arrays.items()})
    return RecordDict({"arrays": new, "metrics": content["metrics"], "info": content["info"]})


def test_an_oversized_reply_with_the_right_shapes_is_rejected() -> None:
    """The byte budget counts the bytes a reply carries: a tensor padded beyond the spec's values
    plus the header allowance is rejected, though its declared shape, dtype and values are right."""
    good = _content()
    carried = sum(len(a.data) for a in good["arrays"].values())
    budget = reply_budget(SPEC)
    assert budget == SPEC.nbytes + 2 * HEADER_ALLOWANCE and carried <= budget  # a real reply fits
    validate_reply(_padded(good, "w", budget - carried), SPEC)  # exactly at the budget: accepted
    with pytest.raises(Rejected, match=rf"payload larger than expected \({budget + 1} > {budget} bytes\)"):
        validate_reply(_padded(good, "w", budget - carried + 1), SPEC)
    with pytest.raises(Rejected, match="payload larger"):
        validate_reply(_padded(good, "b", 10_000_000), SPEC)
    with pytest.raises(Rejected, match="payload larger"):  # a caller's own budget
        validate_reply(good, SPEC, max_bytes=carried - 1)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_content(state={"w": _state()["w"]}), "missing"),
        (_content(state={**_state(), "lora_A": np.zeros(3, np.float32)}), "unexpected"),
        (_content(state={"w": np.zeros((3, 2), np.float32), "b": _state()["b"]}), "shape"),
        (_content(state={"w": np.zeros((2, 3), np.float64), "b": _state()["b"]}), "dtype"),
        (_content(state={"w": np.full((2, 3), np.nan, np.float32), "b": _state()["b"]}), "NaN"),
        (_content(state={"w": np.full((2, 3), np.inf, np.float32), "b": _state()["b"]}), "NaN or Inf"),
        (_content(frozen="other"), "hash"),
        (_content(examples=-5.0), "num-examples"),
        (_content(examples=0.0), "num-examples"),
        (_content(examples=float("nan")), "num-examples"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(content: RecordDict, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        validate_reply(content, SPEC)
    assert reason in str(info.value)


def test_strategy_drops_bad_replies_and_averages_the_rest(caplog: pytest.LogCaptureFixture, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config({"privacy.epsilon": "inf"})
    strategy = AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h")

    def reply(content: RecordDict) -> Message:
        out = Message(content=RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(1))})}), dst_node_id=1,
                      message_type="train")
        return Message(content=content, reply_to=out)

    good1 = _content(state=_state(1.0), examples=10.0, client="a")
    good2 = _content(state=_state(3.0), examples=30.0, client="b")
    poisoned = _content(state={"w": np.full((2, 3), 1e30, np.float32) * np.inf, "b": _state()["b"]}, client="x")
    wrong_a = _content(state=_state(100.0), frozen="evil", client="y")
    oversized = _padded(_content(state=_state(100.0), client="z"), "w", 1_000_000)
    arrays, metrics = strategy.aggregate_train(1, [reply(good1), reply(poisoned), reply(good2), reply(wrong_a),
                                                   reply(oversized)])
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.5, np.float32))
    assert len(strategy.report.accepted) == 2 and len(strategy.report.rejected) == 3
    assert any("rejected reply" in r.message for r in caplog.records)
    assert any("rejected reply" in r.message and "payload larger than expected" in r.message
               for r in caplog.records)
