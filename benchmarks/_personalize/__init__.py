"""Parts of ``benchmarks/personalize.py``, fedpeft's main job: per-client accuracy of each personalization method.

One concept per module:

- ``config``   the run configuration and the training budget every method shares (hyper-parameters)
- ``images``   the image transforms: the clients' shift families, the pre-training letters and augmentations
- ``data``     every client-data source: MNIST digits in shift families or Dirichlet skew, or image folders
- ``backbone`` the frozen ViT: the shipped pre-trained weights (or their rebuild from the recipe), or a real timm model
- ``methods``  the methods: the library's registry, Local-FT, the clustered oracle, and the tags that select them
- ``train``    the budget's local trainer, the optimizer rule every method shares
- ``flops``    the matmul FLOPs a method's run needs, the machine's matmul rate
- ``run``      prepare a seed, run a method (the in-process engine), every (seed, method) in worker processes
- ``flower_engine``  the same runs through Flower's simulation runtime (``--engine flower``)
- ``stats``    mean ± 95 % t-interval over seeds, paired claims with Holm, exact MDD, exploratory hints
- ``report``   the table, the verdicts, the regime go/no-go, pFedPG's server line, CSV, JSON and the plot
- ``cli``      the command line: parse and check every flag, then run and report

Every method uses fedpeft's public API only.
"""
