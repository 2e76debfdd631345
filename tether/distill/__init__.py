"""Distillation and supervised algorithms: each fills the rollout record (teacher log-probs, behaviour
log-probs, rewards) and ``tether.distill.loop`` applies an objective preset to it.

Algorithms: ``opd`` (teacher LM, on-policy), ``opsd`` (self-distillation with privileged context),
``sft`` / ``pear`` (off-policy, teacher samples or stored rows), ``blackbox`` (teacher text only,
sequence-level reward), ``rl`` (task reward, no teacher). See docs/distill.md.
"""
