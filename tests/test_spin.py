"""spin(): poll until something turns up or the time is over (no timing asserted)."""

from poolport.server.spin import spin


def test_returns_the_first_truthy_result_without_polling_again():
    answers = iter([[], None, [("fd", 1)], ["never asked"]])
    calls = []

    def poll():
        calls.append(1)
        return next(answers)

    assert spin(poll, 60.0) == [("fd", 1)]
    assert len(calls) == 3


def test_gives_up_with_the_last_falsy_result():
    calls = []

    def poll():
        calls.append(1)
        return []

    assert spin(poll, 0.0) == []
    assert len(calls) == 1  # a zero budget still polls once
