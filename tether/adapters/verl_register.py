"""Import this module in every verl worker to register the ``tether_<preset>`` policy losses:
``actor_rollout_ref.model.external_lib=tether.adapters.verl_register`` (docs/adapters.md)."""

from tether.adapters.verl import register_with_verl

REGISTERED = register_with_verl()
