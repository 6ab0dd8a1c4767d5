from model_api.engine.stops import StopMatcher


def feed_all(m: StopMatcher, pieces):
    out = "".join(m.feed(p) for p in pieces)
    return out + ("" if m.stopped else m.flush())


def test_no_stops_passes_text_through():
    m = StopMatcher(())
    assert m.feed("abc") == "abc"


def test_stop_inside_one_piece_is_not_emitted():
    m = StopMatcher(("END",))
    assert feed_all(m, ["hello END world"]) == "hello "
    assert m.stopped


def test_stop_split_across_pieces_is_held_back():
    m = StopMatcher(("END",))
    assert m.feed("hello E") == "hello "
    assert m.feed("N") == ""
    assert m.feed("D more") == ""
    assert m.stopped


def test_false_start_is_released():
    m = StopMatcher(("END",))
    assert m.feed("E") == ""
    assert m.feed("X") == "EX"
    assert not m.stopped
    assert m.feed("EN") == ""
    assert m.flush() == "EN"


def test_earliest_of_several_stops_wins():
    m = StopMatcher(("b", "a"))
    assert feed_all(m, ["xxab"]) == "xx"
