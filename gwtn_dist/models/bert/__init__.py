"""The BERT family: BERT encoders trained with masked-LM on text (``model.family: bert``).

``net``: the nets and their shape; ``names``: Hugging Face parameter names and folders;
``config``: the ``model`` section; ``task``: batches, scores and imitated features;
``export``: the Hugging Face folder ``gwtn export`` writes; ``family``: the ``Family`` the
stages use (registered as ``bert``).
"""
