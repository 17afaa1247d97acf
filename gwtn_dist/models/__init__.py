"""Model families: one package per family (``resnet/``, ``bert/``), the ``Family`` protocol and
its registry (``family.py``), and the linear pairs between thin and wide nets (``bridge.py``)."""

# The families that come with gwtn_dist, by ``model.family``: each package's ``config`` module
# (its ``model`` section; imports no torch, so loading a config stays light) and its ``family``
# module (the nets and the ``Family``; imported on first use).
BUILTIN_FAMILIES = {"resnet": "gwtn_dist.models.resnet", "bert": "gwtn_dist.models.bert"}
