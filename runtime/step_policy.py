"""Which dual-routing policy a step runs: the model's quality for every
sequence, or each sequence's own when a batched step mixes them (the server's
requests). One policy for all keeps a preset's counts inside the step graph
(in memory); a mix routes on the host, a policy per sequence's rows."""

from __future__ import annotations


def route_step(model, sizes: list[int], qualities) -> None:
    """Set up ``model.routed`` for a step over sequences of ``sizes`` new
    tokens; ``qualities`` per sequence (None, or None items: the model's)."""
    routed, own = model.routed, model.options.quality
    qualities = qualities or [None] * len(sizes)
    policies = [routed.policy_for(q or own, model.levels) for q in qualities]
    if all(p == policies[0] for p in policies):
        use_policy(model, policies[0])
        return
    if routed.in_memory and routed.resident:
        routed.resident = False
        routed.host_for_mix = True  # back in the graph once the mix is gone
        model._rebuild_step()
    routed.row_policies = tuple(zip(policies, sizes))


def use_policy(model, policy) -> None:
    """Run ``policy`` from the next step; in memory, rebuild the step graphs
    when its counts (or host routing) change what they compute."""
    routed = model.routed
    if policy == routed.policy and not routed.host_for_mix:
        return
    routed.policy = policy
    routed.host_for_mix = False
    if routed.in_memory:
        routed.resident = policy.counts(model.spec.n_expert_used) is not None
        model._rebuild_step()
