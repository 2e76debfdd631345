"""Scale-out (issue 16): rollout workers as Ray actors over the shared run, with a weight transport.

``transport.py`` moves the trainer's weights to the workers (filesystem backend), ``worker.py`` is a rollout
worker (an engine and the probe), ``driver.py`` is ``--mode dist``: another driver over ``tether.train.run.Run``.
Ray is an optional extra (``pip install tether[dist]``); only ``driver.py`` and ``worker.py``'s actor need it.
"""
