"""The ResNet family: bottleneck ResNets for image classification (``model.family: resnet``).

``net``: the nets and their shape; ``names``: torchvision/timm parameter names; ``config``:
the ``model`` section; ``task``: batches, scores and imitated features; ``family``: the
``Family`` the stages use (registered as ``resnet``).
"""
