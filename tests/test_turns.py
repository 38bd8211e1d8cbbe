"""``regroup_turns`` (worker/turns.py): which local state a worker keeps when it adopts the server's
view of its lease. Found by the full suite (test_fleet's frozen worker, once in a loaded run): a
worker stopped between training and pushing lost its heads to another worker, which trained and
merged their round; the heads then moved back to it, it kept its stale turn, re-pushed the stale
factors under the new round id, the update guard refused them three times and quarantined an
honest worker."""

from __future__ import annotations

from lte.proto import parameter_server_pb2 as pb
from lte.worker.turns import Turn, regroup_turns


class FakeTrainer:
    """What ``regroup_turns`` reads and calls of a ``LocalTrainer``: head ids, steps, ``keep_heads``."""

    def __init__(self, head_ids: list[int], steps_done: list[int]) -> None:
        self.head_ids, self.steps_done = list(head_ids), list(steps_done)

    def keep_heads(self, keep: list[int]) -> None:
        self.head_ids = [self.head_ids[i] for i in keep]
        self.steps_done = [self.steps_done[i] for i in keep]


def view(*heads: tuple[int, int, int]) -> list[pb.HeadAssignment]:
    """The lease's heads as (head id, steps done, next round), each with merged factors."""
    return [pb.HeadAssignment(head_id=h, steps_done=s, next_round=r, has_factors=True) for h, s, r in heads]


def test_a_head_trained_elsewhere_since_the_workers_view_is_rebuilt_from_pulled_factors():
    built: list[tuple[list[int], list[int]]] = []

    def build(ids: list[int], steps: list[int]) -> FakeTrainer:
        built.append((ids, steps))
        return FakeTrainer(ids, steps)

    turn = Turn(FakeTrainer([2, 3], [20, 20]))  # trained round 2 of heads 2 and 3, not pushed yet
    heads = view((2, 30, 3), (3, 30, 3))  # meanwhile another worker trained and merged round 2
    turns, moved = regroup_turns([turn], heads, 2, fresh=False, build=build, trained_elsewhere={2, 3})
    assert turn not in turns  # the stale turn is never pushed
    assert built == [([2, 3], [30, 30])]  # rebuilt at the server's steps
    assert moved == [2, 3]  # with the server's factors pulled


def test_held_heads_whose_round_did_not_move_keep_their_state_exactly():
    turn = Turn(FakeTrainer([0, 1, 2], [10, 10, 10]))

    def build(ids: list[int], steps: list[int]) -> FakeTrainer:
        return FakeTrainer(ids, steps)

    heads = view((0, 10, 1), (2, 10, 1), (1, 20, 2))  # head 1 was trained elsewhere, the rest not
    turns, moved = regroup_turns([turn], heads, 3, fresh=False, build=build, trained_elsewhere={1})
    assert turns[0] is turn and turn.head_ids == [0, 2]  # kept, the same object: its state carries over
    assert [t.head_ids for t in turns[1:]] == [[1]] and moved == [1]
    turns, moved = regroup_turns([turn], view((0, 10, 1), (2, 10, 1)), 3, fresh=False, build=build)
    assert turns == [turn] and moved is None  # nothing new: no pull
