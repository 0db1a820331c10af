"""How long an e2e wait may take, derived from what it waits for (not from one quiet run).

Everything an e2e test waits for on the control plane is a chain of reactions: one controller (the
operator, the job controller, the scheduler, kwok's stages, the ServiceAccount controller) sees a change
and writes the next one. On an idle machine a reaction takes well under a second. :data:`REACTION_S`
bounds one on this project's machines at their busiest: 2 cores shared by etcd, the API server, the
controllers, the operator, CPU trainings, Prometheus and, in CI, a Go build in the background.

Periodic work adds its period: the operator reacts to a watch event at once, and a missed one at its
next sweep (``handlers.TIMER_INTERVAL``); an alert needs a scrape and a rule evaluation of Prometheus.
A wait's bound is the number of reactions in its chain times :data:`REACTION_S`, plus those periods.
A bound only decides how long a failing test takes to say so: a passing test returns at once.
"""

from __future__ import annotations

from finetune_operator.handlers import TIMER_INTERVAL

#: One controller's reaction to one change, on a loaded 2-core machine.
REACTION_S = 20.0
#: The operator heals anything a missed watch event left at its next sweep over every job.
SWEEP_S = TIMER_INTERVAL


def reactions(count: int, *, periods: float = 0.0) -> float:
    """Bound of a wait on ``count`` reactions in a row, plus ``periods`` seconds of periodic work."""
    return count * REACTION_S + periods


def operator(count: int = 1) -> float:
    """Bound of a wait on the operator (``count`` reactions of it and of the controllers it drives,
    one of which may be a missed event that only the next sweep heals)."""
    return reactions(count, periods=SWEEP_S)


#: The operator creating or patching a child, or its status, after a change it watches.
OPERATOR_S = operator(1)
#: A Job's pods Running: job controller (pods), scheduler (binding), kwok (Running), after the operator
#: created the Job.
PODS_RUNNING_S = operator(4)
#: A FineTuneJob phase that follows the pods: kwok (pod status), job controller (Job status), operator.
PHASE_S = operator(3)
