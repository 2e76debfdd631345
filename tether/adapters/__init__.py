"""tether inside other trainers (docs/adapters.md): optional, each module imports its framework.

- ``tether.adapters.trl``: ``TetherGRPOTrainer``, a TRL ``GRPOTrainer`` whose loss is a tether preset
  and whose logs carry tether's metrics and the mismatch meter (needs the ``trl`` extra);
- ``tether.adapters.verl``: ``tether_<preset>`` policy losses for verl's registry (verl is imported
  only by ``register_with_verl``);
- ``tether.adapters.common``: what both share (preset resolution, the meter as floats), torch only.

Importing this package imports neither TRL nor verl.
"""
