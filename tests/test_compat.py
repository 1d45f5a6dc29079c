"""The private Ray APIs of raycmr.compat exist in the installed Ray and mean what we use them for."""

from __future__ import annotations

from raycmr import compat


def test_every_private_ray_api_is_still_there() -> None:
    problems = compat.missing_private_apis()
    assert not problems, ("a Ray upgrade moved private APIs raycmr uses (fix raycmr/compat.py): "
                          + "; ".join(problems))


def test_asha_replay_moves_a_trial_through_its_rungs() -> None:
    """Replayed results land in the trial's bracket exactly as reported ones would: a trial
    replayed at the rungs is kept or stopped by the same cutoffs as a live one."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class Trial:
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    live = AsyncHyperBandScheduler(metric="m", mode="max", time_attr="epoch", max_t=8,
                                   grace_period=1, reduction_factor=2, brackets=1)
    replayed = AsyncHyperBandScheduler(metric="m", mode="max", time_attr="epoch", max_t=8,
                                       grace_period=1, reduction_factor=2, brackets=1)
    results = [{"epoch": e, "m": 0.1 * e} for e in (1, 2, 4)]
    for sched in (live, replayed):
        sched._trial_info["a"] = sched._brackets[0]
    for r in results:
        live._brackets[0].on_result(Trial("a"), r["epoch"], r["m"])
    compat.asha_replay(replayed, Trial("a"), results)
    rungs = [(m, dict(rec)) for m, rec in replayed._brackets[0]._rungs]
    assert rungs == [(m, dict(rec)) for m, rec in live._brackets[0]._rungs]
    assert sorted(m for m, rec in rungs if rec == {"a": 0.1 * m}) == [1, 2, 4]
