"""Parts of ``benchmarks/personalize.py``, fedpeft's main job: per-client accuracy of each personalization method.

One concept per module:

- ``config``   the run configuration and the training budget shared by every method (hyper-parameters)
- ``shifts``   the visual domain shifts of ``--split domain`` (inverted, rotated, noisy, blurred, coloured, sketch)
- ``data``     the embedded data: scikit-learn's digits, the public/client split, domain and Dirichlet splits
- ``folders``  real data: one ImageFolder per client (``--data PATH``)
- ``augment``  the pre-training augmentations of the default backbone (``--pretrain clean`` / ``broad``)
- ``backbone`` the frozen ViT: a small timm ViT pre-trained on the public split (cached), or a real timm model
- ``train``    the budget's local trainer (``fedpeft.protocols.LocalTrainer``), the optimizer rule every method shares
- ``methods``  each method's client model and its library protocol (``fedpeft.protocols``): no protocol lives here
- ``runner``   rounds × methods with the in-process engine (``fedpeft.protocols.Federation``) and a progress bar
- ``flops``    the matmul FLOPs a method's run needs (``torch.utils.flop_counter``), the machine's matmul rate
- ``jobs``     the units of work: prepare a seed (data + backbone), run one method on one seed
- ``parallel`` the (seed, method) jobs in spawned worker processes, one torch thread each, one progress bar
- ``stats``    mean ± 95 % t-interval over seeds, paired comparisons and their verdicts
- ``report``   the table, the verdicts, pFedPG's server diagnostics, CSV, JSON and the plot
- ``checks``   command-line checks that need more than argparse (models, folders, splits, the output folder)
- ``cli``      the command line (``main(argv)``)

Every method uses fedpeft's public API only.
"""
