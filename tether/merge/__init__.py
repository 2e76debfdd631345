"""Model merging: combine fine-tuned checkpoints of one base model into one (``tether merge``).

``ram``: the merge maths (task vectors, shared/unique coordinates, RAM / RAM+ / averaging), torch only.
``folders``: reading and writing checkpoint folders. ``config``: the typed settings of ``tether merge``.
"""
