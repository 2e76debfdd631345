"""A stand-in for ``ray`` inside .venv-verl, written there by scripts/setup_verl.sh only when tether's own
environment has no ray. It is never on the path of tether's own test run (only on that of the verl
parity run, tests/unit/test_verl_parity.py).

Why: the verl code the parity tests call (``verl.trainer.ppo.core_algos``, ``rollout_corr_helper``,
``verl.workers.config``) reaches ray only through ``verl.protocol``, which names ``ray.ObjectRef`` in type
annotations and in ``isinstance`` checks the losses never run. The real ray wheel is 240 MB of the 270 MB
such an install takes, and about two thirds of its time. Here ``ObjectRef`` is a class nothing is an
instance of, and any other attribute is an error that says what to do, so a verl release that uses more
of ray while importing its loss code fails loudly instead of running against a fake.
"""

__version__ = "0.0.0+tether-stub"


class ObjectRef:
    """Stands for ``ray.ObjectRef`` in verl's annotations; nothing is an instance of it."""


def __getattr__(name: str):
    raise AttributeError(
        f"ray.{name}: this is tether's stand-in for ray (scripts/verl_stubs/ray), which provides only ObjectRef; "
        "verl now needs more of ray to import its loss code: run TETHER_VERL_REAL_RAY=1 bash scripts/setup_verl.sh")
