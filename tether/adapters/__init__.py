"""tether inside other trainers (docs/adapters.md): optional, each module imports its framework.

- ``tether.adapters.trl``: ``TetherGRPOTrainer``, a TRL ``GRPOTrainer`` whose loss is a tether preset
  and whose logs carry tether's metrics and the mismatch meter (needs the ``trl`` extra);
- ``tether.adapters.trl_dump``: ``LogProbDump``, per-token dumps for ``tether meter`` from a
  ``TetherGRPOTrainer`` (``callbacks=``) or TRL's own ``GRPOTrainer`` (``LogProbDump(path).attach(trainer)``);
- ``tether.adapters.verl``: ``tether_<preset>`` policy losses for verl's registry (verl is imported
  only by ``register_with_verl``);
- ``tether.adapters.common``: what both share (preset resolution, the meter as floats, the KL term added to
  a preset), torch only.

Importing this package imports neither TRL nor verl.
"""
